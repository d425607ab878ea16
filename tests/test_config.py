"""Config loading: every shipped config resolves, and user mistakes fail in one named line."""
from pathlib import Path

import pytest

from pylon.config import ConfigError, load_config, to_dict, to_yaml
from pylon.configfile import CONFIG_DIR

SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.name
    assert cfg.data.image_size % 32 == 0


def test_bare_name_resolves_in_configs_dir_with_or_without_suffix():
    assert load_config("pylon_r50.yaml").model.arch == "pylon"
    assert load_config("pylon_r50").train.epochs == 50


def test_paper_config_follows_reference_recipe():
    cfg = load_config("pylon_r50.yaml")
    assert (cfg.model.backbone, cfg.model.weights, cfg.data.image_size) == ("resnet50", "imagenet", 256)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer) == (50, 64, 1e-4, "adam")
    assert cfg.train.amp and set(cfg.data.sources) == {"kaggle", "rsna"}


def test_baselines_extend_the_pylon_recipe_and_change_only_the_model():
    pylon, base = to_dict(load_config("pylon_r50.yaml")), to_dict(load_config("baseline_r50.yaml"))
    assert base["model"]["arch"] == "baseline"
    for section in ("data", "train", "eval", "logging"):
        assert base[section] == pylon[section]
    assert load_config("baseline_r18.yaml").model.backbone == "resnet18"


def test_any_smp_encoder_and_registered_source_is_accepted():
    cfg = load_config("pylon_r50.yaml", ["model.backbone=efficientnet-b0", "data.sources=[nih]", "data.roots={nih: x}"])
    assert (cfg.model.backbone, list(cfg.data.sources), cfg.data.roots["nih"]) == ("efficientnet-b0", ["nih"], "x")


def test_overrides_are_typed_and_applied():
    cfg = load_config("pylon_r50.yaml", ["train.epochs=5", "data.sources=[kaggle]", "train.pos_weight=auto"])
    assert cfg.train.epochs == 5 and list(cfg.data.sources) == ["kaggle"] and cfg.train.pos_weight == "auto"
    assert load_config("pylon_r50.yaml", ["train.pos_weight=2.5"]).train.pos_weight == 2.5


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.epoch=5"], "unknown key 'train.epoch'"),
        (["model.decoder.n_dec=3"], "unknown key 'model.decoder.n_dec'"),
        (["train.epochs=many"], "bad value for 'train.epochs'"),
        (["model.arch=vit"], "bad value for 'model.arch'"),
        (["data.image_size=100"], "data.image_size must be a multiple of 32"),
        (["data.sources=[chexpert]"], "data.sources must be a non-empty list of ['kaggle', 'nih', 'rsna']"),
        (["data.std=0"], "data.std positive"),
        (["data.num_workers=-1"], "data.num_workers must be 0 or more"),
        (["train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["model.backbone=resnet999"], "model.backbone='resnet999' is not a segmentation-models-pytorch encoder"),
        (["model.decoder.seg_kern_size=2"], "model.decoder.seg_kern_size must be a positive odd number"),
        (["model.encoder_depth=2"], "model.encoder_depth must be 3, 4 or 5, got 2"),
        (["model.encoder_depth=4"], "model.decoder.n_up must be 0 to 2 with model.encoder_depth=4, got 3"),
        (["eval.methods=[gradcam2]"], "eval.methods must be among"),
        (["train.freeze_encoder_epochs=1", "model.freeze=enc"], "both freeze the encoder"),
        (["train.pos_weight=lots"], "train.pos_weight"),
        (["train.epochs"], "--set expects section.key=value"),
        (["data.augment.crop_scale=[0.5]"], "bad value for 'data.augment.crop_scale'"),
        (["train=5"], "bad value for 'train'"),
        (["eval.methods=[pylon"], "bad value for 'eval.methods': '[pylon' is not valid YAML"),
        (["data.sources=[rsna,nih]"], "rsna's films are NIH ChestX-ray14 films"),
        (["data.augment.hflip=1.5"], "data.augment.hflip is a probability, got 1.5"),
        (["model.n_in=3"], "model.n_in and model.n_out must be 1"),
        (["model.n_out=2"], "model.n_in and model.n_out must be 1"),
        (["train.pos_weight=-1.0"], "train.pos_weight must be a positive number"),
        (["train.pos_weight=.nan"], "train.pos_weight must be a positive number"),
        (["train.pos_weight=auto", "data.balanced_sampler=true"], "positives would count twice"),
        (["train.weight_decay=-1.0"], "train.min_lr and train.weight_decay 0 or more"),
        (["train.min_lr=-1.0e-5", "train.scheduler=cosine"], "train.min_lr and train.weight_decay 0 or more"),
        (["train.grad_clip=-1.0"], "train.grad_clip must be positive or null"),
        (["train.plateau_factor=1.0"], "train.plateau_factor must be in (0, 1)"),
        (["train.plateau_patience=-1"], "train.plateau_patience 0 or more"),
        (["train.finetune_lr_factor=-0.1"], "train.finetune_lr_factor must be in (0, 1]"),
        (["train.warmup_epochs=60"], "train.warmup_epochs must be in [0, 50]"),
        (["train.freeze_encoder_epochs=2", "train.warmup_epochs=3"], "train.warmup_epochs must be in [0, 2]"),
        (["train.freeze_encoder_epochs=1", "train.lr=5.0e-6"], "x train.finetune_lr_factor=0.1 is below train.min_lr"),
        (["data.source_shares={rsna: 1, nih: 1, kaggle: 1}"], "data.source_shares: ['nih'] not in data.sources"),
        (["data.source_shares={rsna: 1}"], "data.source_shares gives no share to ['kaggle']"),
        (["data.source_shares={rsna: 0, kaggle: 1}"], "data.source_shares values must be positive numbers"),
        (["data.source_shares={rsna: .inf, kaggle: 1}"], "data.source_shares values must be positive numbers"),
        (["data.source_shares={rsna: many}"], "bad value for 'data.source_shares.rsna'"),
        (["train.select_on=nih"], "train.select_on must be one of ['pooled', 'mean_sources', 'kaggle', 'rsna'], got 'nih'"),
    ],
)
def test_bad_overrides_fail_in_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("pylon_r50.yaml", overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_is_named_with_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'train\.learning_rate'"):
        load_config(path)


@pytest.mark.parametrize("old, new", [("data.kaggle_root", "data.roots.kaggle"), ("data.rsna_root", "data.roots.rsna"),
                                      ("data.rsna_test_fraction", "data.test_fraction")])
def test_a_renamed_key_names_its_new_key(tmp_path, old, new):
    with pytest.raises(ConfigError, match=rf"^--set: {old} was replaced by {new}$"):
        load_config("pylon_r50.yaml", [f"{old}=0.2"])
    section, key = old.split(".")
    with pytest.raises(ConfigError, match=rf"c\.yaml: {old} was replaced by {new}$"):
        load_config(write(tmp_path, f"extends: {CONFIG_DIR / 'demo.yaml'}\n{section}:\n  {key}: 0.2\n"))
    assert load_config("pylon_r50.yaml", [f"{new}=0.2"])


def test_roots_are_set_per_source_from_the_command_line():
    cfg = load_config("pylon_r50.yaml", ["data.roots.rsna=/data/rsna", "data.roots.nih=/data/nih"])
    assert dict(cfg.data.roots) == {"kaggle": "datasets/kaggle", "rsna": "/data/rsna", "nih": "/data/nih"}


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim'"):
        load_config(write(tmp_path, "optim:\n  lr: 0.1\n"))


def test_missing_file_lists_known_configs():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml .*pylon_r50.yaml"):
        load_config("nope.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: line 2 is not valid YAML"):
        load_config(write(tmp_path, "train:\n  epochs: 3: 4\n"))


def test_extends_is_relative_to_the_file_and_detects_loops(tmp_path):
    write(tmp_path, "name: base\ntrain:\n  epochs: 7\n", "base.yaml")
    child = load_config(write(tmp_path, "extends: base.yaml\nname: child\n"))
    assert (child.name, child.train.epochs) == ("child", 7)
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("item, whole", [
    ("data.sources[0]=rsna", "--set data.sources=[kaggle, rsna]"),
    ("data.augment.crop_scale.0=0.5", "--set data.augment.crop_scale=[0.7, 1.0]"),
    ("data.augment.crop_scale[1]=0.9", "--set data.augment.crop_scale=[0.7, 1.0]"),
])
def test_a_list_item_override_is_refused_naming_the_key_and_the_whole_list_form(item, whole):
    with pytest.raises(ConfigError) as err:
        load_config("pylon_r50.yaml", [item])
    message = str(err.value)
    assert message.startswith(f"--set {item.split('=')[0]}: items of a list cannot be set one by one")
    assert whole in message and "\n" not in message


def test_a_dict_key_that_looks_like_an_index_is_still_a_key():
    roots = load_config("pylon_r50.yaml", ["data.roots.0=/x"]).data.roots
    assert roots == {"kaggle": "datasets/kaggle", "rsna": "datasets/rsna", "0": "/x"}


def test_extends_takes_a_list_merged_in_order(tmp_path):
    write(tmp_path, "name: one\ntrain:\n  epochs: 7\n  lr: 0.5\n", "one.yaml")
    write(tmp_path, "name: two\ntrain:\n  epochs: 9\n", "two.yaml")
    cfg = load_config(write(tmp_path, "extends: [one.yaml, two.yaml]\ntrain:\n  batch_size: 3\n"))
    assert (cfg.name, cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == ("two", 9, 0.5, 3)
    with pytest.raises(ConfigError, match="'extends' takes a file name or a list of file names, got 5"):
        load_config(write(tmp_path, "extends: 5\n"))


def test_extends_naming_a_folder_says_it_is_a_folder(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(ConfigError, match="extends .*configs, which is a folder; name a config file"):
        load_config(write(tmp_path, "extends: configs\n"))


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("baseline_r18.yaml", ["train.epochs=2"])
    saved = write(tmp_path, to_yaml(cfg), "resolved.yaml")
    assert to_dict(load_config(saved)) == to_dict(cfg)


def test_an_interrupt_says_interrupted_and_no_resume_advice_of_its_own(capsys):
    from pylon import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as code:
        cli.run(interrupted, [])
    assert code.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # train.py names the run to resume, when there is one


@pytest.mark.parametrize("overrides, key", [(["data.folds=1"], "data.folds"), (["data.folds=3", "data.fold=3"], "data.folds"),
                                            (["data.patient_maps={nih: x.csv}"], "data.patient_maps")])
def test_cross_validation_and_patient_map_keys_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config("demo.yaml", overrides)


def test_a_stored_run_config_with_old_keys_still_loads(tmp_path):
    """Runs trained before data.roots, data.test_fraction and the demo generator's move still
    evaluate and resume: their stored config.yaml is carried over, a user's config is refused."""
    stored = tmp_path / "config.yaml"
    stored.write_text(to_yaml(load_config("demo.yaml")).replace(
        "  roots:\n    kaggle: datasets/demo/kaggle\n    rsna: datasets/demo/rsna\n",
        "  kaggle_root: /data/kaggle\n  rsna_root: /data/rsna\n  roots: {}\n  generate_demo: true\n"
    ).replace("  test_fraction: 0.25", "  rsna_test_fraction: 0.25"))
    cfg = load_config(stored, stored=True)
    assert dict(cfg.data.roots) == {"kaggle": "/data/kaggle", "rsna": "/data/rsna"}
    assert cfg.data.test_fraction == 0.25 and "generate_demo" not in cfg.data
    with pytest.raises(ConfigError, match="data.kaggle_root was replaced by data.roots.kaggle"):
        load_config(stored)
