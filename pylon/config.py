"""The whole experiment as typed dataclasses, loaded from YAML and overridden with --set. OmegaConf
checks types and rejects unknown keys; ``validate`` checks value ranges once, here, so the library
below trusts its config. Every error is one line naming the key or file."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pylon import ConfigError  # defined beneath every module that raises it; importable from here too
from pylon.configfile import read_yaml, resolve_config_path

DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
# Keys that are gone -> (the key that replaced it, or None and what to do instead): a config or --set
# naming one is told this, not "unknown key"; a run folder's stored config.yaml has them carried over.
OLD_KEYS: dict[str, tuple[Optional[str], Optional[str]]] = {
    "data.kaggle_root": ("data.roots.kaggle", None), "data.rsna_root": ("data.roots.rsna", None),
    "data.rsna_test_fraction": ("data.test_fraction", None),
    "data.generate_demo": (None, "training no longer writes the demo data; make it once with python "
                                 "tools/make_demo.py --out datasets/demo (or make demo) and delete the key")}


@dataclass
class DecoderConfig:
    """PYLON's decoder (ignored by baselines); names follow the reference implementation."""
    n_dec_ch: int = 128
    n_up: int = 3
    seg_kern_size: int = 1
    use_pa: bool = True
    up_type: Literal["2layer", "1layer"] = "2layer"
    up_kernel_size: int = 1


@dataclass
class ModelConfig:
    arch: Literal["pylon", "baseline"] = "pylon"
    backbone: str = "resnet50"
    encoder_depth: int = 5
    weights: Optional[str] = "imagenet"
    n_in: int = 1
    n_out: int = 1
    freeze: Optional[Literal["enc", "bn"]] = None
    pretrain: Optional[str] = None
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pooling: Literal["avg", "max"] = "avg"


@dataclass
class AugmentConfig:
    """Defaults are the reference implementation's training augmentation."""
    enabled: bool = True
    rotate_limit: float = 90.0
    p_rotate: float = 0.5
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    brightness: float = 0.5
    contrast: float = 0.5
    p_brightness_contrast: float = 0.5


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["kaggle", "rsna"])
    roots: dict[str, str] = field(default_factory=lambda: {"kaggle": "datasets/kaggle", "rsna": "datasets/rsna"})
    image_size: int = 256
    resize: Literal["letterbox", "stretch"] = "stretch"
    cache_dir: str = "datasets/cache"
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # of the patients of each source without an official test split
    split_seed: int = 0
    folds: int = 0  # k > 0: fold `fold` of k (label-stratified) is the test split instead of test_fraction
    fold: int = 0
    # source -> CSV of image id (first column) -> person (a column named patient or *_patient), for
    # splits and bootstrap intervals; a relative path is taken from the source's root
    patient_maps: dict[str, str] = field(default_factory=dict)
    mean: float = 0.4984
    std: float = 0.2483
    normalize_from_train: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    balanced_sampler: bool = False
    source_shares: dict[str, float] = field(default_factory=dict)  # of training draws, by source; {}: by size
    num_workers: int = 4


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 64
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    warmup_epochs: float = 0.0  # the rate rises step by step to lr over these epochs; then the scheduler starts
    weight_decay: float = 0.0
    scheduler: Literal["plateau", "cosine", "none"] = "plateau"
    plateau_patience: int = 1
    plateau_factor: float = 0.2
    min_lr: float = 1e-6
    early_stop_patience: Optional[int] = None
    pos_weight: Union[float, str, None] = None
    amp: bool = True
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_clip: Optional[float] = None
    freeze_encoder_epochs: int = 0
    finetune_lr_factor: float = 0.1
    max_steps_per_epoch: Optional[int] = None
    select_on: str = "pooled"  # the val loss that picks best.pt: pooled, mean_sources or a source's name
    seed: int = 0
    device: str = "auto"


@dataclass
class EvalConfig:
    split: Literal["val", "test", "all"] = "test"  # all: every image of the sources, no split (external data)
    batch_size: int = 32
    methods: list[str] = field(default_factory=list)
    bootstrap: int = 1000
    pointing_tolerance_px: float = 15.0
    n_overlays: int = 8


@dataclass
class LoggingConfig:
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "pylon-cxr"
    entity: Optional[str] = None
    group: Optional[str] = None  # a W&B group, e.g. one per cross-validation (tools/crossval.py sets it)
    runs_dir: str = "runs"
    log_every_steps: int = 10
    n_val_images: int = 4


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _one_line(err: Exception, origin: str, override: str = "") -> ConfigError:
    key, _, value = override.partition("=")
    key = getattr(err, "full_key", None) or key.strip() or "?"
    if isinstance(err, yaml.YAMLError):  # --set values are parsed as YAML
        return ConfigError(f"{origin}: bad value for '{key}': {value!r} is not valid YAML")
    if key in OLD_KEYS:
        return _old_key(origin, key)
    message = str(err).splitlines()[0].replace("$VALUE_TYPE", "text").replace("$VALUE", value)
    if "not in" in message or type(err).__name__ == "ConfigKeyError":
        return ConfigError(f"{origin}: unknown key '{key}'")
    return ConfigError(f"{origin}: bad value for '{key}': {message}")


def _old_key(origin: str, key: str) -> ConfigError:
    new, advice = OLD_KEYS[key]
    return ConfigError(f"{origin}: {key} was replaced by {new}" if new else f"{origin}: '{key}' was removed: {advice}")


def restrict_overrides(overrides: list[str], allowed: tuple[str, ...], when: str, advice: str) -> None:
    """Reject ``--set`` keys outside ``allowed`` (exact keys, or prefixes ending in '.'), by name."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if OLD_KEYS.get(key, (None,))[0]:  # renamed: name its new key (a removed one is refused below)
            raise _old_key("--set", key)
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            names = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
            raise ConfigError(f"--set {key} cannot change {when} (only {names}); {advice}")


def load_config(name_or_path: Union[str, Path], overrides: Optional[list[str]] = None, *,
                stored: bool = False) -> ExperimentConfig:
    """The validated experiment config (an OmegaConf view of :class:`ExperimentConfig`). ``stored``:
    a run folder's config.yaml, whose renamed or removed keys are carried over, not refused."""
    path = resolve_config_path(name_or_path)
    layer = read_yaml(path)
    if stored:  # the old keys are all under data
        for old, (new, _) in OLD_KEYS.items():
            value = (layer.get("data") or {}).pop(old.split(".", 1)[1], None)
            if new and value is not None:
                OmegaConf.update(layer, new, value, force_add=True)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), layer)
    except OmegaConfBaseException as err:
        raise _one_line(err, str(path)) from None
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Any, overrides: list[str]) -> ExperimentConfig:
    """A new config: ``cfg`` (left as it is) with the ``--set`` items merged in, validated."""
    for item in overrides:  # one at a time, so that an error names its key
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"--set expects section.key=value, got '{item}'")
        key = item.split("=", 1)[0].strip()
        # a.b[0] or a.b.0 on a list: the dot-list merge fails with a TypeError naming no key, and
        # OmegaConf cannot set one item of a tuple, so a list is given whole.
        match = re.match(r"(.+?)(\[|\.\d+(?:\.|$))", key)
        value = match and OmegaConf.select(cfg, match.group(1), default=None)
        is_list = isinstance(value, Sequence) and not isinstance(value, str)  # a ListConfig or a TupleConfig
        if match and (match.group(2) == "[" or is_list):
            example = f"[{', '.join(map(str, value))}]" if is_list else "[...]"
            raise ConfigError(f"--set {key}: items of a list cannot be set one by one; give the whole list, "
                              f"e.g. --set {match.group(1)}={example}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise _one_line(err, "--set", item) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Any) -> None:
    """Value ranges and combinations the types cannot express, each named by its key. One check per
    section; a rule across sections sits with the section of the key it restricts."""
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_train(cfg.train, cfg.model, cfg.data)
    _check_eval(cfg.eval)
    _require(cfg.logging.log_every_steps >= 1, f"logging.log_every_steps must be at least 1, got {cfg.logging.log_every_steps}")


def _check_data(d: Any) -> None:
    from pylon.data.sources import SOURCES, exclusions

    unknown = [s for s in d.sources if s not in SOURCES]
    _require(bool(d.sources) and not unknown,
             f"data.sources must be a non-empty list of {sorted(SOURCES)}, got {list(d.sources)}")
    clashes = exclusions(d.sources)
    _require(not clashes, f"data.sources: {'; '.join(clashes)}; use one")
    _require(d.image_size >= 64 and d.image_size % 32 == 0,
             f"data.image_size must be a multiple of 32 and at least 64, got {d.image_size}")
    low, high = d.augment.crop_scale
    _require(0 < low <= high <= 1, f"data.augment.crop_scale must satisfy 0 < low <= high <= 1, got {[low, high]}")
    for name in ("hflip", "p_rotate", "p_brightness_contrast"):
        _require(0 <= d.augment[name] <= 1, f"data.augment.{name} is a probability, got {d.augment[name]}")
    _require(0 < d.augment.crop_ratio[0] <= d.augment.crop_ratio[1],
             f"data.augment.crop_ratio must be two positive numbers, low <= high, got {list(d.augment.crop_ratio)}")
    for name in ("val_fraction", "test_fraction"):
        _require(0 < d[name] < 1, f"data.{name} must be between 0 and 1, got {d[name]}")
    _require(d.folds == 0 or (d.folds >= 2 and 0 <= d.fold < d.folds),
             f"data.folds must be 0 (no cross-validation) or at least 2, and data.fold in 0..folds-1, got "
             f"{d.folds} and {d.fold}")
    _require(set(d.patient_maps) <= set(d.sources),
             f"data.patient_maps names sources not in data.sources: {sorted(set(d.patient_maps) - set(d.sources))}")
    _require(math.isfinite(d.mean) and math.isfinite(d.std) and d.std > 0,
             f"data.mean and data.std must be finite and data.std positive, got {d.mean} and {d.std}")
    _require(d.num_workers >= 0, f"data.num_workers must be 0 or more, got {d.num_workers}")
    shares = dict(d.source_shares)  # relative, normalised where used; a source left out would never be drawn
    unknown, missing = sorted(set(shares) - set(d.sources)), [s for s in d.sources if s not in shares]
    _require(not unknown, f"data.source_shares: {unknown} not in data.sources {list(d.sources)}")
    _require(not shares or not missing,
             f"data.source_shares gives no share to {missing}; name every source of data.sources")
    _require(all(math.isfinite(v) and v > 0 for v in shares.values()),
             f"data.source_shares values must be positive numbers, got {shares}")


def _check_model(m: Any) -> None:
    from segmentation_models_pytorch.encoders import encoders

    _require(m.backbone in encoders or m.backbone.startswith("tu-"), f"model.backbone={m.backbone!r} is not a "
             "segmentation-models-pytorch encoder; e.g. resnet18, resnet50, efficientnet-b0, tu-<timm model>")
    _require(m.n_in == 1 and m.n_out == 1, "model.n_in and model.n_out must be 1 to train on grey radiographs with "
             f"one label (PylonConfig takes others), got {m.n_in}, {m.n_out}")
    _require(3 <= m.encoder_depth <= 5, f"model.encoder_depth must be 3, 4 or 5, got {m.encoder_depth}")
    dec = m.decoder
    finest = m.encoder_depth - 2  # UP modules add features down to 1/4 of the input, no finer
    _require(0 <= dec.n_up <= finest, f"model.decoder.n_up must be 0 to {finest} with model.encoder_depth="
             f"{m.encoder_depth}, got {dec.n_up}")
    _require(dec.n_dec_ch >= 1, f"model.decoder.n_dec_ch must be positive, got {dec.n_dec_ch}")
    for name in ("seg_kern_size", "up_kernel_size"):  # 'same' padding k // 2 needs odd kernels
        _require(dec[name] >= 1 and dec[name] % 2 == 1, f"model.decoder.{name} must be a positive odd number, got {dec[name]}")


def _check_train(t: Any, m: Any, d: Any) -> None:
    _require(t.epochs >= 1 and t.batch_size >= 1, "train.epochs and train.batch_size must be positive")
    _require(t.pos_weight in (None, "auto") or (not isinstance(t.pos_weight, str) and 0 < t.pos_weight < math.inf),
             f"train.pos_weight must be a positive number, 'auto' or null, got '{t.pos_weight}'")
    _require(not (t.pos_weight == "auto" and d.balanced_sampler), "data.balanced_sampler already balances the "
             "classes; with train.pos_weight=auto positives would count twice: use one")
    _require(t.lr > 0 and t.min_lr >= 0 and t.weight_decay >= 0,
             f"train.lr must be positive, train.min_lr and train.weight_decay 0 or more, got {t.lr}, {t.min_lr}, {t.weight_decay}")
    _require(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be positive or null, got {t.grad_clip}")
    _require(0 < t.plateau_factor < 1 and t.plateau_patience >= 0,
             f"train.plateau_factor must be in (0, 1) and train.plateau_patience 0 or more, got {t.plateau_factor}, "
             f"{t.plateau_patience}")
    warmup_end = t.freeze_encoder_epochs or t.epochs  # stage two's rate cut must not land inside the warm-up
    _require(0 <= t.warmup_epochs <= warmup_end, f"train.warmup_epochs must be in [0, {warmup_end}] "
             f"(train.freeze_encoder_epochs, else train.epochs), got {t.warmup_epochs}")
    _require(0 < t.finetune_lr_factor <= 1, f"train.finetune_lr_factor must be in (0, 1], got {t.finetune_lr_factor}")
    for name in ("early_stop_patience", "max_steps_per_epoch"):
        _require(t[name] is None or t[name] >= 1, f"train.{name} must be at least 1 or null, got {t[name]}")
    _require(t.freeze_encoder_epochs >= 0, f"train.freeze_encoder_epochs must be 0 or more, got {t.freeze_encoder_epochs}")
    _require(not (t.freeze_encoder_epochs and m.freeze == "enc"),
             "train.freeze_encoder_epochs and model.freeze=enc both freeze the encoder: use one")
    stage_two = t.lr * (t.finetune_lr_factor if t.freeze_encoder_epochs else 1.0)  # the lowest rate before any decay
    _require(not (t.scheduler == "plateau" and stage_two < t.min_lr),
             f"train.lr={t.lr}" + (f" x train.finetune_lr_factor={t.finetune_lr_factor}" if t.freeze_encoder_epochs else "")
             + f" is below train.min_lr={t.min_lr}: the run would stop after one epoch at that rate")
    _require(re.fullmatch(DEVICE_PATTERN, t.device) is not None,
             f"train.device must be auto, cpu, cuda or cuda:N, got '{t.device}'")
    selectable = ["pooled", "mean_sources", *d.sources]
    _require(t.select_on in selectable, f"train.select_on must be one of {selectable}, got '{t.select_on}'")


def _check_eval(e: Any) -> None:
    from pylon.heatmaps import METHODS  # here, not at the top: importing pylon.config does not load torch

    _require(e.batch_size >= 1, "eval.batch_size must be positive")
    _require(set(e.methods) <= set(METHODS), f"eval.methods must be among {list(METHODS)}, got {list(e.methods)}")
    _require(e.bootstrap >= 0 and e.pointing_tolerance_px >= 0 and e.n_overlays >= 0,
             "eval.bootstrap, eval.pointing_tolerance_px and eval.n_overlays must be 0 or more")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: Any) -> dict:
    """Plain containers (for W&B, checkpoints and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
