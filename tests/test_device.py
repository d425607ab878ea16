"""The one precision decision (pylon.device): CPU with and without native bf16, amp off, CUDA's
choice, and what a bf16 step and forward keep in float32."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pylon import device as device_module
from pylon.device import Precision, choose_precision, describe_precision
from pylon.engine import train_step
from pylon.distributed import Dist
from pylon.heatmaps import heatmaps
from pylon.models import BaselineConfig, PylonConfig

CPU = torch.device("cpu")


def train_cfg(amp: bool = True, channels_last: bool = True, amp_dtype: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(amp=amp, amp_dtype=amp_dtype, channels_last=channels_last, grad_clip=None)


@pytest.mark.parametrize("native, amp, channels_last, expected", [
    (True, True, True, "bf16+channels_last"),
    (True, True, False, "bf16"),
    (True, False, True, "fp32"),  # amp off: the reference fp32 path, default layout
    (False, True, True, "fp32"),  # emulated bf16 would be slower than fp32
    (False, False, True, "fp32"),
])
def test_cpu_precision_follows_native_bf16_and_train_amp(monkeypatch, native, amp, channels_last, expected):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    precision = choose_precision(CPU, train_cfg(amp, channels_last))
    assert precision.name == expected
    assert precision.dtype == (torch.bfloat16 if expected.startswith("bf16") else None)
    assert not precision.needs_loss_scaling
    line = describe_precision(precision, train_cfg(amp, channels_last))
    assert expected in line and ("train.amp=false" in line if not amp else "bf16" in line)


@pytest.mark.parametrize("amp, amp_dtype, bf16_gpu, expected", [
    (True, "auto", True, "bf16+channels_last"),
    (True, "auto", False, "fp16+channels_last"),
    (True, "fp16", True, "fp16+channels_last"),
    (False, "auto", True, "fp32+channels_last"),
])
def test_cuda_precision_is_the_configured_autocast(monkeypatch, amp, amp_dtype, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    precision = choose_precision(torch.device("cuda:0"), train_cfg(amp, amp_dtype=amp_dtype))
    assert precision.name == expected
    assert precision.needs_loss_scaling == expected.startswith("fp16")


def test_native_bf16_detection_matches_the_cpu_flags():
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if not flags:
        pytest.skip("no CPU flags listed")
    assert device_module.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_layout_converts_models_and_batches_only_for_channels_last():
    x = torch.randn(2, 1, 64, 64)
    assert Precision(CPU).layout(x) is x
    fast = Precision(CPU, torch.bfloat16, True)
    assert fast.layout(x).is_contiguous(memory_format=torch.channels_last)
    conv = fast.layout(torch.nn.Conv2d(1, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("make", [
    lambda: PylonConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model(),
    lambda: BaselineConfig(n_in=1, n_out=1, backbone="resnet18").make_model(),
])
def test_a_bf16_step_keeps_weights_statistics_and_outputs_in_float32(make):
    torch.manual_seed(0)
    precision = Precision(CPU, torch.bfloat16, True)
    model = precision.layout(make())
    batch = {"image": torch.randn(4, 1, 64, 64), "label": torch.tensor([[1.0], [0.0], [1.0], [0.0]])}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = train_cfg()
    loss = train_step(model, batch, optimizer, torch.nn.BCEWithLogitsLoss(), scaler, Dist(device=CPU), cfg)
    assert 0 < loss < 10
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # BatchNorm statistics stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in state.items() if k.endswith("running_mean"))
    model.eval()
    with torch.no_grad(), precision.autocast():
        out = model(precision.layout(batch["image"]))
    # The head (PYLON) and the classifier (baseline) run in float32 under autocast: no bf16 ties.
    assert out.logits.dtype == torch.float32 and out.heatmap.dtype == torch.float32


def test_pylon_heatmaps_at_bf16_keep_float64_and_match_fp32_closely():
    torch.manual_seed(0)
    model = PylonConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model().eval()
    x = torch.randn(2, 1, 64, 64)
    exact = heatmaps(model, x, "pylon")
    fast = heatmaps(model, x, "pylon", precision=Precision(CPU, torch.bfloat16, True))
    assert fast.dtype == torch.float64 and fast.shape == exact.shape
    assert (fast - exact).abs().max() < 0.05


def test_bf16_pylon_training_repeats_exactly_at_a_small_input():
    """At 64 px the attention pyramid's 1/64 level is 1x1, where oneDNN's bf16 weight gradient of
    a wide 7x7 conv is garbage that changes run to run; the pyramid runs in float32 instead."""
    def train_three_steps() -> dict:
        torch.manual_seed(0)
        precision = Precision(CPU, torch.bfloat16, True)
        model = precision.layout(PylonConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            batch = {"image": torch.randn(8, 1, 64, 64, generator=generator),
                     "label": (torch.rand(8, 1, generator=generator) > 0.5).float()}
            train_step(model, batch, optimizer, torch.nn.BCEWithLogitsLoss(),
                       torch.amp.GradScaler("cpu", enabled=False), Dist(device=CPU), train_cfg())
        return model.state_dict()

    first, second = train_three_steps(), train_three_steps()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++"])
def test_cam_style_maps_are_fp32_whatever_the_precision(method):
    torch.manual_seed(0)
    model = BaselineConfig(n_in=1, n_out=1, backbone="resnet18").make_model().eval()
    x = torch.randn(2, 1, 64, 64)
    fast = Precision(CPU, torch.bfloat16, True)
    torch.testing.assert_close(heatmaps(fast.layout(model), x, method, precision=fast), heatmaps(model, x, method),
                               atol=1e-5, rtol=1e-5)
