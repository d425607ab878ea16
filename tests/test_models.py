"""PYLON and baseline models: parameter parity with the original PYLON, shapes at many
input sizes, the logit/heatmap relations, weights and checkpoint loading, freezing."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pylon.models import (
    BaselineClassifier,
    BaselineConfig,
    ModelOutput,
    Pylon,
    PylonConfig,
    WeightsFileError,
    WeightsUnavailableError,
    build_model,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_pylon(**fields) -> Pylon:
    fields = {"n_in": 1, "n_out": 1, "backbone": "resnet18", "weights": None, **fields}
    return PylonConfig(**fields).make_model()


# ---------------------------------------------------------------- parameter parity

# Totals of the original PYLON implementation with weights=None (resnet50, n_in=1, n_out=1
# unless stated).
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
    conf = {"n_in": 1, "n_out": 1, "weights": None, **fields}
    assert n_params(PylonConfig(**conf).make_model()) == expected


def test_parameter_split_of_default_model():
    model = PylonConfig(n_in=1, n_out=1, weights=None).make_model()
    assert n_params(model.encoder) == 23_501_760
    assert n_params(model.decoder) == 1_975_175
    assert n_params(model.head) == 129


# ---------------------------------------------------------------- PYLON forward


@pytest.mark.parametrize("size", [64, 224, 256, 512])
def test_pylon_shapes(size):
    model = small_pylon().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (1, 1)
    assert out.heatmap.shape == (1, 1, size // 4, size // 4)
    assert out.heatmap.dtype == torch.float32


def test_pylon_non_square_multi_class():
    model = small_pylon(n_out=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 320, 96))
    assert out.logits.shape == (2, 3)
    assert out.heatmap.shape == (2, 3, 80, 24)
    assert torch.equal(out.logits, out.heatmap.amax(dim=(-2, -1)))


@pytest.mark.parametrize("n_up,scale", [(0, 32), (1, 16), (2, 8)])
def test_fewer_up_modules_give_coarser_heatmaps(n_up, scale):
    model = small_pylon(n_up=n_up).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 256))
    assert out.heatmap.shape == (1, 1, 256 // scale, 256 // scale)


def test_logits_are_heatmap_max():
    model = small_pylon(n_out=2).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 128, 128))
    expected = F.adaptive_max_pool2d(out.heatmap, 1).flatten(1)
    assert torch.equal(out.logits, expected)


def test_attention_matches_power_of_two_pyramid_at_multiples_of_256():
    """At 256/512 px our size-robust pyramid must compute exactly the original's: floor
    max-pooling by 2 and bilinear (align_corners) upsampling by a factor of 2."""
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
            expected = a * attn.project(x)
            assert torch.equal(attn(x), expected)


def test_bad_input_shape_is_rejected():
    model = small_pylon().eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 1, 100, 128))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(1, 3, 128, 128))


def test_gradients_reach_encoder_and_decoder():
    model = small_pylon().train()
    out = model(torch.randn(2, 1, 128, 128))
    F.binary_cross_entropy_with_logits(out.logits, torch.tensor([[1.0], [0.0]])).backward()
    for part in (model.encoder.conv1, model.encoder.layer4, model.decoder.attention.down1,
                 model.decoder.ups[2], model.head):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_freeze_encoder_keeps_it_fixed_through_an_adam_step():
    model = small_pylon(freeze="enc").train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert not model.encoder.training and model.decoder.training  # encoder BN stays in eval
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(torch.randn(2, 1, 128, 128))
    F.binary_cross_entropy_with_logits(out.logits, torch.ones(2, 1)).backward()
    optimizer.step()

    for key, value in model.encoder.state_dict().items():  # weights and BN statistics
        assert torch.equal(value, enc_before[key]), key
    changed = [k for k, v in model.decoder.state_dict().items() if not torch.equal(v, dec_before[k])]
    assert any(k.endswith("weight") for k in changed)
    assert any("running_mean" in k for k in changed)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"backbone": "vgg16"}, "backbone"),
        ({"up_type": "3layer"}, "up_type"),
        ({"freeze": "dec"}, "freeze"),
        ({"n_up": 4}, "n_up"),
        ({"n_in": 0}, "n_in"),
        ({"seg_kern_size": 2}, "seg_kern_size"),
        ({"weights": 5}, "weights"),
    ],
)
def test_pylon_config_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        PylonConfig(**{"n_in": 1, "n_out": 1, "weights": None, **fields})


def test_build_model_factory():
    assert isinstance(build_model("pylon", n_in=1, n_out=1, backbone="resnet18", weights=None), Pylon)
    assert isinstance(build_model("baseline", backbone="resnet18"), BaselineClassifier)
    with pytest.raises(ValueError, match="arch"):
        build_model("unet", n_in=1, n_out=1)
    with pytest.raises(ValueError, match="n_dec"):
        build_model("pylon", n_in=1, n_out=1, n_dec=64)
    with pytest.raises(ValueError, match="n_in"):
        build_model("pylon", n_out=1)


# ---------------------------------------------------------------- weights


def test_imagenet_weights_offline_fail_fast_with_advice(monkeypatch):
    from huggingface_hub import try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    cached = try_to_load_from_cache(settings["repo_id"], "model.safetensors", revision=settings["revision"])
    if isinstance(cached, str):
        pytest.skip("ImageNet weights are in the local cache: nothing to fail on")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for conf in (PylonConfig(n_in=1, n_out=1, backbone="resnet18"),
                 BaselineConfig(backbone="resnet18", weights="imagenet")):
        with pytest.raises(WeightsUnavailableError, match=r"model\.weights=null"):
            conf.make_model()


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsFileError, match="nope.pth"):
        small_pylon(weights=str(missing))


def test_unreadable_weights_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsFileError, match="junk.pth"):
        small_pylon(weights=str(junk))


def test_wrong_architecture_weights_are_rejected(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(WeightsFileError, match="does not fit"):
        small_pylon(weights=str(path))  # resnet18


def test_torchvision_rgb_weights_load_into_grayscale_encoder(tmp_path):
    reference = torchvision.models.resnet18()  # 3 input channels, with an fc layer
    path = tmp_path / "resnet18_rgb.pth"
    torch.save(reference.state_dict(), path)

    model = small_pylon(weights=str(path))
    encoder_state = model.encoder.state_dict()
    expected_conv1 = reference.conv1.weight.sum(dim=1, keepdim=True)  # summed over RGB
    assert torch.allclose(encoder_state["conv1.weight"], expected_conv1)
    for key, value in reference.state_dict().items():
        if key != "conv1.weight" and not key.startswith("fc."):
            assert torch.equal(encoder_state[key], value), key

    # A gray image through the adapted model == the same image repeated in RGB through the
    # original weights (what summing conv1 is meant to preserve).
    baseline = BaselineConfig(backbone="resnet18", weights=str(path)).make_model().eval()
    reference.eval()
    gray = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ours = baseline.features(gray)
        trunk = nn.Sequential(*list(reference.children())[:-2])
        theirs = trunk(gray.repeat(1, 3, 1, 1))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_encoder_weights_from_a_model_checkpoint_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = small_pylon()
    with_prefix = tmp_path / "pylon_full.pt"  # keys like 'encoder.layer1.0.conv1.weight'
    torch.save({"model": source.state_dict()}, with_prefix)
    plain = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(plain))
    for path in (with_prefix, plain):
        model = small_pylon(weights=str(path))
        for key, value in source.encoder.state_dict().items():
            assert torch.equal(model.encoder.state_dict()[key], value), (path.name, key)


# ---------------------------------------------------------------- whole-model checkpoints


@pytest.mark.parametrize("wrapped", [True, False])
def test_pretrain_checkpoint_round_trip(tmp_path, wrapped):
    source = small_pylon(n_out=2).eval()
    state = source.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "epoch": 3} if wrapped else state, path)
    restored = small_pylon(n_out=2, pretrain=str(path), weights="imagenet").eval()  # no fetch
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x).heatmap, source(x).heatmap)


def test_pretrain_checkpoint_of_another_config_is_rejected(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(small_pylon(n_out=2).state_dict(), path)
    with pytest.raises(WeightsFileError, match="ckpt.pt"):
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


@pytest.mark.parametrize(
    "backbone,encoder_params,width",
    [("resnet18", 11_170_240, 512), ("resnet34", 21_278_400, 512), ("resnet50", 23_501_760, 2048)],
)
def test_baseline_backbones_build(backbone, encoder_params, width):
    model = BaselineConfig(backbone=backbone, n_out=2).make_model()
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == width
    assert n_params(model) == encoder_params + width * 2 + 2
    assert model.target_layer is model.encoder.layer4


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_baseline_shapes_and_cam_relation(pooling):
    model = BaselineConfig(backbone="resnet18", n_out=2, pooling=pooling).make_model().eval()
    assert model.pooling == pooling
    x = torch.randn(2, 1, 224, 160)
    captured = {}
    handle = model.target_layer.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        out = model(x)
        features = model.features(x)
    handle.remove()
    assert out.logits.shape == (2, 2)
    assert out.heatmap.shape == (2, 2, 7, 5)
    assert torch.equal(captured["out"], features)
    # CAM = the linear layer applied at every location.
    cam = torch.einsum("kc,nchw->nkhw", model.fc.weight, features) + model.fc.bias[:, None, None]
    assert torch.allclose(out.heatmap, cam, atol=1e-5)
    if pooling == "avg":
        assert torch.allclose(out.logits, out.heatmap.mean(dim=(-2, -1)), atol=1e-5)
    else:
        assert torch.equal(out.logits, out.heatmap.amax(dim=(-2, -1)))


def test_baseline_freeze_and_pretrain(tmp_path):
    source = BaselineConfig(backbone="resnet18", pooling="max").make_model().eval()
    path = tmp_path / "baseline.pt"
    torch.save({"model": source.state_dict()}, path)
    model = BaselineConfig(backbone="resnet18", pooling="max", pretrain=str(path), freeze="enc").make_model()
    model.train()
    assert not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters()) and model.fc.weight.requires_grad
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x).heatmap, source(x).heatmap)


def test_baseline_config_rejects_bad_pooling():
    with pytest.raises(ValueError, match="pooling"):
        BaselineConfig(pooling="maxpool")
