"""pylon.heatmaps on small real models (ResNet-18 and one non-ResNet encoder, random weights,
64-128 px)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pylon.heatmaps import box_prior, heatmaps, methods_for
from pylon.metrics import argmax_points
from pylon.models import BaselineConfig, PylonConfig

OTHER_ENCODER = "mobilenet_v2"


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return BaselineConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model()


@pytest.fixture(scope="module")
def pylon_model():
    torch.manual_seed(0)
    return PylonConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model()


@pytest.fixture
def images():
    return torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))


EXPECTED_SHAPES = {
    "pylon": (2, 16, 16),  # 1/4 of the input
    "cam": (2, 2, 2),  # 1/32
    "gradcam": (2, 64, 64),  # pytorch-grad-cam upsamples to the input
    "gradcam++": (2, 64, 64),
    "center": (2, 64, 64),
}


def test_methods_for(baseline, pylon_model):
    assert methods_for(pylon_model) == ["pylon", "prior", "center"]
    assert methods_for(baseline) == ["cam", "gradcam", "gradcam++", "prior", "center"]
    with pytest.raises(AssertionError, match="Linear"):
        methods_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["pylon", "center", "cam", "gradcam", "gradcam++"])
def test_every_method_gives_finite_maps_at_its_native_resolution(method, baseline, pylon_model, images):
    model = pylon_model if method in methods_for(pylon_model) and method != "center" else baseline
    maps = heatmaps(model, images, method)
    assert tuple(maps.shape) == EXPECTED_SHAPES[method]
    assert maps.dtype == (torch.float64 if method == "pylon" else torch.float32)
    assert maps.device.type == "cpu"
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


def test_methods_of_models_over_another_encoder(images):
    torch.manual_seed(0)
    pylon = PylonConfig(n_in=1, n_out=1, backbone=OTHER_ENCODER, weights=None).make_model()
    baseline = BaselineConfig(n_in=1, n_out=1, backbone=OTHER_ENCODER).make_model()
    for model in (pylon, baseline):
        for method in set(methods_for(model)) - {"prior"}:
            maps = heatmaps(model, images, method)
            assert tuple(maps.shape) == EXPECTED_SHAPES[method], method
            assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_pylon_method_is_the_sigmoid_of_the_decoder_logits_without_a_graph(pylon_model, images):
    pylon_model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(pylon_model(images).heatmap[:, 0].double())
    seen = []
    hook = pylon_model.head.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        maps = heatmaps(pylon_model, images, "pylon")
    finally:
        hook.remove()
    torch.testing.assert_close(maps, expected)
    assert seen == [False]  # the forward pass recorded no graph
    assert not maps.requires_grad and maps.grad_fn is None
    assert all(p.grad is None for p in pylon_model.parameters())


def test_cam_is_the_min_max_normalised_class_map(baseline):
    x = torch.randn(3, 1, 128, 128, generator=torch.Generator().manual_seed(2))
    baseline.eval()
    with torch.no_grad():
        raw = baseline(x).heatmap[:, 0]
    low = raw.amin(dim=(1, 2), keepdim=True)
    expected = (raw - low) / (raw.amax(dim=(1, 2), keepdim=True) - low)
    torch.testing.assert_close(heatmaps(baseline, x, "cam"), expected)


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


@pytest.mark.parametrize("backbone", ["resnet18", OTHER_ENCODER])
def test_gradcam_explains_the_positive_logit_even_when_it_is_negative(backbone):
    torch.manual_seed(3)
    model = BaselineConfig(n_in=1, n_out=1, backbone=backbone, weights=None).make_model()
    with torch.no_grad():  # positive evidence weights, strongly negative bias: logit << 0
        model.fc.weight.copy_(model.fc.weight.abs())
        model.fc.bias.fill_(-100.0)
    x = torch.randn(2, 1, 128, 128, generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        assert (model(x).logits < 0).all()
        feats = model.features(x)
    maps = heatmaps(model, x, "gradcam")
    assert (maps.flatten(1).std(dim=1) > 0.05).all()  # not a constant map
    # With average pooling the logit's gradient w.r.t. the features is fc.weight / (h * w),
    # so Grad-CAM is ReLU(fc.weight . features) at 1/32, min-max scaled and resized bilinearly.
    class_map = F.conv2d(feats, model.fc.weight[:, :, None, None])[:, 0].clamp_min(0).detach().numpy()
    for got, cam in zip(maps.numpy(), class_map):
        expected = _minmax(cv2.resize(_minmax(cam), (128, 128), interpolation=cv2.INTER_LINEAR))
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_center_map_peaks_at_the_image_centre(baseline):
    for height, width in ((64, 64), (96, 64)):
        maps = heatmaps(baseline, torch.zeros(1, 1, height, width), "center")
        x, y = argmax_points(maps, (height, width))[0]
        # Even sizes: the centre is a pixel corner; the first of the four nearest pixels wins.
        assert (x, y) == (width / 2 - 0.5, height / 2 - 0.5)


def test_box_prior_is_the_mean_box_mask_of_the_boxed_images():
    boxes = [
        [(0, 0, 4, 4)],  # top-left quarter
        [(0, 0, 4, 8), (4, 4, 4, 4)],  # left half + bottom-right quarter: 3/4 of the image
        [],  # no boxes (a negative): not part of the mean
    ]
    prior = box_prior(boxes, 8)
    expected = np.zeros((8, 8))
    expected[:4, :4] += 1
    expected[:, :4] += 1
    expected[4:, 4:] += 1
    np.testing.assert_allclose(prior.numpy(), expected / 2)
    assert box_prior([[], []], 8) is None


def test_prior_method_is_the_same_map_for_every_image_at_the_input_size(pylon_model, baseline, images):
    prior = box_prior([[(8, 16, 16, 32)]], 32)  # stored at another size: resized to the input
    for model in (pylon_model, baseline):
        maps = heatmaps(model, images, "prior", prior=prior)
        assert tuple(maps.shape) == (2, 64, 64)
        assert torch.equal(maps[0], maps[1])
        x, y = argmax_points(maps, (64, 64))[0]
        assert 16 <= x <= 48 and 32 <= y <= 96
    with pytest.raises(ValueError, match="box prior"):
        heatmaps(pylon_model, images, "prior")


@pytest.fixture(scope="module")
def frozen_baseline():
    torch.manual_seed(5)
    return BaselineConfig(n_in=1, n_out=1, backbone="resnet18", weights=None, freeze="enc").make_model()


def test_gradient_methods_work_inside_inference_mode_and_with_a_frozen_encoder(frozen_baseline, images):
    with torch.inference_mode():
        for method in ("gradcam", "gradcam++"):
            maps = heatmaps(frozen_baseline, images, method)
            assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()


def test_model_modes_are_restored(frozen_baseline, images):
    model = frozen_baseline
    for method in set(methods_for(model)) - {"prior"}:  # the image-blind methods never run the model
        model.train()  # the frozen encoder stays in eval, the rest trains
        before = {name: m.training for name, m in model.named_modules()}
        assert not before["encoder"] and before[""]
        heatmaps(model, images, method)
        assert {name: m.training for name, m in model.named_modules()} == before, method
        model.eval()
        heatmaps(model, images, method)
        assert not any(m.training for m in model.modules()), method


def test_pylon_mode_is_restored(pylon_model, images):
    pylon_model.train()
    heatmaps(pylon_model, images, "pylon")
    assert all(m.training for m in pylon_model.modules())
    pylon_model.eval()


def test_maps_are_of_class_0_of_a_multi_output_model(images):
    torch.manual_seed(7)
    model = PylonConfig(n_in=1, n_out=3, backbone="resnet18", weights=None).make_model().eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(images).heatmap[:, 0].double())
    torch.testing.assert_close(heatmaps(model, images, "pylon"), expected)


def test_pylon_maps_keep_confident_peaks_apart(images):
    """Logits above ~17 all round to 1.0 in a float32 sigmoid; the peak must survive."""
    torch.manual_seed(0)
    model = PylonConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model().eval()
    with torch.no_grad():
        model.head.bias += 25.0 - model(images).heatmap.max()
        raw = model(images).heatmap[:, 0]
    assert (torch.sigmoid(raw.float()) == 1.0).sum() > 2 * len(raw)  # float32 would tie
    maps = heatmaps(model, images, "pylon")
    assert torch.equal(maps.flatten(1).argmax(1), raw.flatten(1).argmax(1))
