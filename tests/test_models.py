"""PYLON and baseline models: parameter parity with the original PYLON, shapes, the
logit/heatmap relations, any smp encoder, weights and checkpoint loading, freezing."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch import nn

from pylon.checkpoint import CheckpointError
from pylon.models import (
    BaselineClassifier,
    BaselineConfig,
    ModelOutput,
    Pylon,
    PylonConfig,
    WeightsFileError,
    WeightsUnavailableError,
    build_model,
    unwrap,
)

OTHER_ENCODER = "mobilenet_v2"  # a non-ResNet smp encoder that builds fast


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_pylon(**fields) -> Pylon:
    return PylonConfig(**{"n_in": 1, "n_out": 1, "backbone": "resnet18", "weights": None, **fields}).make_model()


def small_baseline(**fields) -> BaselineClassifier:
    return BaselineConfig(**{"backbone": "resnet18", **fields}).make_model()


# ---------------------------------------------------------------- parameter parity

# Totals of the original PYLON implementation (resnet50, n_in=1, n_out=1 unless stated).
REFERENCE_COUNTS = [
    ({}, 25_477_064),
    ({"n_in": 3}, 25_483_336),
    ({"n_out": 14}, 25_478_741),
    ({"backbone": "resnet34"}, 21_515_528),
    ({"backbone": "resnet18"}, 11_407_368),
    ({"use_pa": False}, 25_376_577),
    ({"up_type": "1layer"}, 24_095_432),
]


@pytest.mark.parametrize("fields,expected", REFERENCE_COUNTS, ids=lambda v: str(v))
def test_parameter_count_matches_reference(fields, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = PylonConfig(**{"n_in": 1, "n_out": 1, "weights": None, **fields}).make_model()
    assert n_params(model) == expected


def test_parameter_split_of_default_model():
    with torch.device("meta"):
        model = PylonConfig(n_in=1, n_out=1, weights=None).make_model()
    assert n_params(model.encoder) == 23_501_760
    assert n_params(model.decoder) == 1_975_175
    assert n_params(model.head) == 129


@pytest.mark.parametrize("backbone,encoder_params,width", [("resnet18", 11_170_240, 512), ("resnet50", 23_501_760, 2048)])
def test_baseline_parameter_counts(backbone, encoder_params, width):
    with torch.device("meta"):
        model = BaselineConfig(backbone=backbone, n_out=2).make_model()
    assert model.fc.in_features == width
    assert n_params(model) == encoder_params + width * 2 + 2
    assert n_params(model.target_layer) == 0


# ---------------------------------------------------------------- PYLON forward


@pytest.mark.parametrize("size", [64, 224])
def test_pylon_shapes_and_logits_are_the_heatmap_max(size):
    model = small_pylon(n_out=2).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 2)
    assert out.heatmap.shape == (2, 2, size // 4, size // 4) and out.heatmap.dtype == torch.float32
    assert torch.equal(out.logits, F.adaptive_max_pool2d(out.heatmap, 1).flatten(1))


def test_pylon_non_square_multi_class():
    model = small_pylon(n_out=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 160, 96))
    assert out.heatmap.shape == (2, 3, 40, 24)
    assert torch.equal(out.logits, out.heatmap.amax(dim=(-2, -1)))


@pytest.mark.parametrize("n_up,scale", [(0, 32), (1, 16), (2, 8)])
def test_fewer_up_modules_give_coarser_heatmaps(n_up, scale):
    model = small_pylon(n_up=n_up).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 128, 128)).heatmap.shape == (1, 1, 128 // scale, 128 // scale)


def test_shallower_encoder_is_the_model_at_half_the_input(tmp_path):
    """Depth 4 at 128 px sees the 8x8 grid that depth 5 sees at 256 px; the unused 1/32 stage stays
    frozen through unfreezing (DDP would wait for its gradients), and deeper files still load."""
    deep = small_pylon()
    torch.save({"model": deep.state_dict()}, tmp_path / "deep.pt")
    model = small_pylon(encoder_depth=4, n_up=2, weights=str(tmp_path / "deep.pt")).train()
    assert torch.equal(model.encoder.layer3[0].conv1.weight, deep.encoder.layer3[0].conv1.weight)
    model.freeze_encoder(False)
    out = model(torch.randn(2, 1, 128, 128))
    assert out.heatmap.shape == (2, 1, 32, 32) and torch.equal(out.logits, out.heatmap.amax(dim=(-2, -1)))
    F.binary_cross_entropy_with_logits(out.logits, torch.tensor([[1.0], [0.0]])).backward()
    assert model.encoder.layer3[0].conv1.weight.grad is not None
    assert not any(p.requires_grad or p.grad is not None for p in model.encoder.layer4.parameters())
    cam = small_baseline(encoder_depth=4).eval()(torch.randn(1, 1, 128, 128)).heatmap
    assert cam.shape == (1, 1, 8, 8)


def test_attention_matches_power_of_two_pyramid_at_multiples_of_256():
    """At 256/512 px the size-robust pyramid computes exactly the original's: floor max-pooling
    by 2 and bilinear (align_corners) upsampling by a factor of 2."""
    attn = small_pylon().decoder.attention.eval()
    for mod in attn.modules():  # non-trivial BN so that every branch matters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)

    def up2(t):
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)

    for side in (8, 16):  # the 1/32 map of 256 and 512 px inputs
        x = torch.randn(2, 512, side, side)
        with torch.no_grad():
            d1 = attn.down1(F.max_pool2d(x, 2))
            d2 = attn.down2(F.max_pool2d(d1, 2))
            d3 = attn.down3(F.max_pool2d(d2, 2))
            a = up2(attn.lateral3(d3))
            a = up2(attn.lateral2(d2) + a)
            a = up2(attn.lateral1(d1) + a)
            assert torch.equal(attn(x), a * attn.project(x))


def test_gradients_reach_encoder_and_decoder():
    model = small_pylon().train()
    out = model(torch.randn(2, 1, 64, 64))
    F.binary_cross_entropy_with_logits(out.logits, torch.tensor([[1.0], [0.0]])).backward()
    for part in (model.encoder.conv1, model.encoder.layer4, model.decoder.attention.down1, model.decoder.ups[2], model.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


# ---------------------------------------------------------------- freezing


def _adam_step(model: nn.Module) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(torch.randn(2, 1, 64, 64))
    F.binary_cross_entropy_with_logits(out.logits, torch.ones(2, 1)).backward()
    optimizer.step()


def test_frozen_encoder_keeps_weights_and_bn_statistics_through_a_train_step():
    model = small_pylon(freeze="enc").train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.training and model.decoder.training
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    _adam_step(model)
    for key, value in model.encoder.state_dict().items():  # weights and BN statistics
        assert torch.equal(value, enc_before[key]), key
    changed = [k for k, v in model.decoder.state_dict().items() if not torch.equal(v, dec_before[k])]
    assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)


def test_frozen_encoder_bn_keeps_statistics_and_trains_everything_else():
    model = small_pylon(freeze="bn").train()
    assert model.decoder.training and model.encoder.conv1.weight.requires_grad
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    weights = model.encoder.conv1.weight.clone()
    _adam_step(model)
    for key, value in stats.items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert not torch.equal(model.encoder.conv1.weight, weights)
    model.eval().train()  # the next epoch after validation: the statistics stay frozen
    assert not model.encoder.bn1.training and model.decoder.training


def test_freeze_encoder_switches_between_stages():
    model = small_pylon().train()
    model.freeze_encoder()
    assert not model.encoder.training and not model.encoder.conv1.weight.requires_grad
    model.train()  # the engine's next epoch: the frozen encoder stays in eval
    assert not model.encoder.training
    model.freeze_encoder(False)
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())
    before = model.encoder.bn1.running_mean.clone()
    _adam_step(model)
    assert not torch.equal(model.encoder.bn1.running_mean, before)


# ---------------------------------------------------------------- any encoder, factory


def test_any_smp_encoder_builds_both_models():
    torch.manual_seed(0)
    pylon = small_pylon(backbone=OTHER_ENCODER, n_out=2).eval()
    baseline = small_baseline(backbone=OTHER_ENCODER, n_out=2).eval()
    assert baseline.fc.in_features == pylon.encoder.out_channels[-1] == 1280
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        out = pylon(x)
        base = baseline(x)
    assert out.heatmap.shape == (2, 2, 16, 24) and torch.equal(out.logits, out.heatmap.amax(dim=(-2, -1)))
    assert base.heatmap.shape == (2, 2, 2, 3)
    torch.testing.assert_close(base.logits, base.heatmap.mean(dim=(-2, -1)))


def test_build_model_from_a_config_section():
    decoder = {"n_dec_ch": 32, "n_up": 2, "seg_kern_size": 3, "use_pa": False, "up_type": "1layer", "up_kernel_size": 3}
    section = OmegaConf.create({"arch": "pylon", "backbone": "resnet18", "encoder_depth": 5, "weights": None, "n_in": 1, "n_out": 2,
                                "freeze": "enc", "pretrain": None, "decoder": decoder, "pooling": "avg"})
    model = build_model(section)
    assert isinstance(model, Pylon) and model.conf.n_dec_ch == 32 and model.conf.up_type == "1layer"
    assert model.head.kernel_size == (3, 3) and len(model.decoder.ups) == 2 and model.frozen_encoder
    section.arch, section.pooling, section.freeze = "baseline", "max", None
    baseline = build_model(section)
    assert isinstance(baseline, BaselineClassifier) and baseline.conf.pooling == "max" and baseline.fc.out_features == 2


def test_unwrap_removes_wrappers():
    class Compiled(nn.Module):  # how torch.compile wraps a module, without its start-up cost
        def __init__(self, module: nn.Module):
            super().__init__()
            self._orig_mod = module

    model = small_baseline()
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(Compiled(model))) is model


# ---------------------------------------------------------------- weights


def test_imagenet_weights_offline_fail_fast_with_advice(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    # The hub reads HF_HUB_OFFLINE and HF_HOME at import; set what it derived from them too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for conf in (PylonConfig(n_in=1, n_out=1, backbone="resnet18"), BaselineConfig(backbone="resnet18", weights="imagenet")):
        with pytest.raises(WeightsUnavailableError, match=r"resnet18 \(LocalEntryNotFoundError.*model\.weights=null.*HF_HUB_OFFLINE=1"):
            conf.make_model()


def test_unusable_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsFileError, match="nope.pth.*no such file"):
        small_pylon(weights=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsFileError, match="cannot read.*junk.pth"):
        small_pylon(weights=str(junk))
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(CheckpointError, match="r34.pth.*weights do not fit"):
        small_pylon(weights=str(wrong))  # resnet18


def test_torchvision_rgb_weights_load_into_grayscale_encoder(tmp_path):
    reference = torchvision.models.resnet18().eval()  # 3 input channels, with an fc layer
    path = tmp_path / "resnet18_rgb.pth"
    torch.save(reference.state_dict(), path)
    baseline = small_baseline(weights=str(path)).eval()
    encoder_state = baseline.encoder.state_dict()
    torch.testing.assert_close(encoder_state["conv1.weight"], reference.conv1.weight.sum(dim=1, keepdim=True))
    for key, value in reference.state_dict().items():
        if key != "conv1.weight" and not key.startswith("fc."):
            assert torch.equal(encoder_state[key], value), key
    # A gray image through the fitted model == the image repeated in RGB through the original.
    gray = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        theirs = nn.Sequential(*list(reference.children())[:-2])(gray.repeat(1, 3, 1, 1))
        torch.testing.assert_close(baseline.features(gray), theirs, atol=1e-4, rtol=1e-4)


def test_encoder_weights_from_a_model_checkpoint_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = small_pylon()
    with_prefix = tmp_path / "pylon_full.pt"  # keys like 'encoder.layer1.0.conv1.weight'
    torch.save({"model": source.state_dict()}, with_prefix)
    plain = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(plain))
    run = tmp_path / "runs" / "baseline-20260101-000000"  # a run folder stands for its best.pt
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": source.state_dict(), "epoch": 3}, run / "checkpoints" / "best.pt")
    for path in (with_prefix, plain, run):
        state = small_pylon(weights=str(path)).encoder.state_dict()
        for key, value in source.encoder.state_dict().items():
            assert torch.equal(state[key], value), (path.name, key)


def test_rgb_weights_file_for_a_timm_encoder_is_fitted_to_one_channel(tmp_path):
    source = BaselineConfig(n_in=3, backbone="tu-mobilenetv3_small_050").make_model()
    path = tmp_path / "timm.pth"
    torch.save({"model": source.state_dict()}, path)
    model = BaselineConfig(n_in=1, backbone="tu-mobilenetv3_small_050", weights=str(path)).make_model()
    stem = "model.conv_stem.weight"
    torch.testing.assert_close(model.encoder.state_dict()[stem], source.encoder.state_dict()[stem].sum(1, keepdim=True))
    assert model(torch.randn(1, 1, 64, 64)).heatmap.shape == (1, 1, 2, 2)


# ---------------------------------------------------------------- whole-model checkpoints


@pytest.mark.parametrize("layout", ["training checkpoint", "state dict", "DDP state dict"])
def test_pretrain_checkpoint_round_trip(tmp_path, layout):
    source = small_pylon(n_out=2).eval()
    path = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v for k, v in source.state_dict().items()} if layout == "DDP state dict" else source.state_dict()
    torch.save({"model": state, "epoch": 3} if layout == "training checkpoint" else state, path)
    restored = small_pylon(n_out=2, pretrain=str(path), weights="imagenet").eval()  # nothing fetched
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x).heatmap, source(x).heatmap)


def test_pretrain_checkpoint_of_another_config_is_rejected(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(small_pylon(n_out=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="ckpt.pt.*weights do not fit"):
        small_pylon(n_out=3, pretrain=str(path))


@pytest.mark.parametrize("up_type", ["2layer", "1layer"])
def test_pretrain_accepts_original_pylon_key_names(tmp_path, up_type):
    """Checkpoints of the original code keep everything under ``net.`` with its own names."""
    source = small_pylon(up_type=up_type).eval()
    rules = [  # ours -> original layout
        (r"^encoder\.", "net.encoder."),
        (r"^head\.", "net.segmentation_head.0."),
        (r"^decoder\.attention\.project\.0\.", "net.decoder.pa.mid.0.conv."),
        (r"^decoder\.attention\.project\.1\.", "net.decoder.pa.mid.0.bn."),
        (r"^decoder\.attention\.down(\d)\.0\.", r"net.decoder.pa.down\1.1.conv."),
        (r"^decoder\.attention\.down(\d)\.1\.", r"net.decoder.pa.down\1.1.bn."),
        (r"^decoder\.attention\.lateral(\d)\.0\.", r"net.decoder.pa.conv\1.conv."),
        (r"^decoder\.attention\.lateral(\d)\.1\.", r"net.decoder.pa.conv\1.bn."),
    ]
    up_names = {"0": "up3", "1": "up2", "2": "up1"}
    original = {}
    for key, value in source.state_dict().items():
        m = re.match(r"^decoder\.ups\.(\d)\.skip\.(\d)\.([01])\.(.*)$", key)
        if m:
            up, layer, part, rest = m.groups()
            inner = "" if up_type == "1layer" else f"{layer}."
            new = f"net.decoder.{up_names[up]}.conv1.{inner}{'conv' if part == '0' else 'bn'}.{rest}"
        else:
            new = key
            for pattern, repl in rules:
                new, n = re.subn(pattern, repl, new)
                if n:
                    break
        original[new] = value
    path = tmp_path / "original.pth"
    torch.save(original, path)
    restored = small_pylon(up_type=up_type, pretrain=str(path)).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


# ---------------------------------------------------------------- baseline


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_baseline_shapes_and_cam_relation(pooling):
    model = small_baseline(n_out=2, pooling=pooling).eval()
    x = torch.randn(2, 1, 96, 64)
    captured = {}
    handle = model.target_layer.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        out = model(x)
        features = model.encoder(x)[-1]
    handle.remove()
    assert out.logits.shape == (2, 2) and out.heatmap.shape == (2, 2, 3, 2)
    assert torch.equal(captured["out"], features)  # the target layer sees the last feature map
    cam = torch.einsum("kc,nchw->nkhw", model.fc.weight, features) + model.fc.bias[:, None, None]
    torch.testing.assert_close(out.heatmap, cam)
    if pooling == "avg":
        torch.testing.assert_close(out.logits, out.heatmap.mean(dim=(-2, -1)))
    else:
        assert torch.equal(out.logits, out.heatmap.amax(dim=(-2, -1)))


def test_baseline_freeze_and_pretrain(tmp_path):
    source = small_baseline(pooling="max").eval()
    path = tmp_path / "baseline.pt"
    torch.save({"model": source.state_dict()}, path)
    model = small_baseline(pooling="max", pretrain=str(path), freeze="enc").train()
    assert not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters()) and model.fc.weight.requires_grad
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x).heatmap, source(x).heatmap)
