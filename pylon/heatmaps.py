"""One entry point for every heatmap the project scores: ``heatmaps(model, images, method)``.

Methods and what they return, (N, h, w) float32 on the CPU, one map per image for class
``target`` (default 0, the single pneumonia logit), each at its native resolution:

* ``"pylon"`` (PYLON models): ``sigmoid`` of the decoder's per-pixel logits, read straight
  off one forward pass under ``torch.no_grad`` (no backward, no graph); 1/4 of the input.
* ``"cam"`` (baselines): the class activation map, i.e. the linear layer applied at every
  location of the last feature map (the baseline's ``out.heatmap``), **min-max normalised
  per image** to [0, 1] (a constant map gives zeros); 1/32 of the input. Min-max rather
  than sigmoid because CAM values are per-location logits whose scale is set by the
  pooling, not calibrated probabilities: an affine rescale keeps the argmax of the
  bilinearly upsampled map exactly that of the raw CAM (a sigmoid does not commute with
  upsampling, and saturates to ties at large logits), and it puts CAM on the same [0, 1]
  scale as Grad-CAM, as is customary.
* ``"gradcam"`` / ``"gradcam++"`` (baselines): pytorch-grad-cam's ``GradCAM`` /
  ``GradCAMPlusPlus`` on ``model.target_layer``. The target is the class logit itself
  (``ClassifierOutputTarget(target)``, which indexes the raw output): for a one-logit
  binary model a softmax target over one class would be constant (zero gradient), and
  ``BinaryClassifierOutputTarget`` only multiplies the whole output vector by +1/-1 (for
  category 0 it explains the *negative* class; with several outputs it would sum them).
  The logit's gradient does not depend on its sign, so images the model calls negative
  still get a map of the evidence *for* pneumonia. The library ReLUs the map, min-max
  normalises it per image and upsamples it to the **input size** (bilinear, half-pixel
  centres, like ``align_corners=False``), so these maps come back at H x W.
* ``"center"`` (any model): a cone peaking at the image centre, at the input size; its
  first maximum is the pixel whose centre is nearest the image centre (for even sizes, the
  top-left of the middle four). The "no model" localization baseline.
* ``"prior"`` (any model, given ``prior``): the mean box mask of the training split's
  positive images (``box_prior``), the same map for every image, at the input size. It
  ignores the image, yet on real films it points into a box far more often than the
  centre does: a method localizes only where it beats it.

The model is run in eval mode and every submodule's train/eval flag is restored afterwards.
Gradient methods need autograd, so they switch it on even inside ``torch.no_grad`` /
``torch.inference_mode``; they leave every parameter's ``.grad`` as ``None`` (the library
zeroes gradients before its backward pass anyway), so do not call them between a training
step's ``backward`` and ``optimizer.step``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pylon.metrics import box_mask
from pylon.models import BaselineClassifier, Pylon

# The image-blind baselines come last: every model gets them.
PYLON_METHODS = ("pylon", "prior", "center")
BASELINE_METHODS = ("cam", "gradcam", "gradcam++", "prior", "center")
METHODS = ("pylon", "cam", "gradcam", "gradcam++", "prior", "center")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, or the model itself."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def methods_for(model: nn.Module) -> List[str]:
    """Every heatmap method ``model`` supports, in reporting order."""
    model = _unwrap(model)
    if isinstance(model, Pylon):
        return list(PYLON_METHODS)
    if isinstance(model, BaselineClassifier):
        return list(BASELINE_METHODS)
    raise TypeError(f"no heatmap methods for a {type(model).__name__}; expected a Pylon or BaselineClassifier")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Restore each submodule's own flag: a frozen encoder stays in eval while the rest trains,
    # which a single model.train(was_training) would undo.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def center_map(n: int, height: int, width: int) -> torch.Tensor:
    """(n, H, W) maps falling linearly from 1 at the image centre to 0 at the corners."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    dist = torch.hypot(ys[:, None] - height / 2.0, xs[None, :] - width / 2.0)
    cone = 1.0 - dist / dist.max().clamp_min(1e-12)
    return cone.expand(n, height, width).clone()


def box_prior(boxes: Sequence[Sequence[Sequence[float]]], image_size: int) -> Optional[torch.Tensor]:
    """(S, S) float32 mean of the box masks of the images that have boxes, or None if none has.

    ``boxes``: one list of ``(x, y, w, h)`` per image, in the ``image_size`` network-input frame.
    Computed from the training split only, it is stored with the run (``best.pt``).
    """
    masks = [box_mask(b, (image_size, image_size)) for b in boxes if len(b)]
    if not masks:
        return None
    return torch.from_numpy(np.mean(masks, axis=0, dtype=np.float64).astype(np.float32))


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


class _Logits(nn.Module):
    """pytorch-grad-cam expects a module returning a logits tensor, not a ``ModelOutput``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _gradient_cam(model: BaselineClassifier, x: torch.Tensor, target: int, method: str) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with torch.inference_mode(False), torch.enable_grad():
        # Inference tensors cannot enter a graph; a plain copy can.
        x = x.clone() if x.is_inference() else x.detach()
        cam = cam_class(model=_Logits(model), target_layers=[model.target_layer])
        # Differentiate w.r.t. the input too, so the target layer's output is part of the
        # graph even when the encoder is frozen (requires_grad=False everywhere before it).
        cam.compute_input_gradient = True
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * x.shape[0])
        finally:
            # Not the context manager: its __exit__ swallows IndexError.
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
    return torch.from_numpy(maps).float()


def _check_images(images: torch.Tensor, n_in: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, {n_in}, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != n_in:
        raise ValueError(f"images must have shape (N, {n_in}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float and normalised like the training inputs, got dtype {images.dtype}")
    return images


def heatmaps(model: nn.Module, images: torch.Tensor, method: str, target: int = 0,
             prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, h, w) float32 CPU heatmaps of ``images`` for class ``target`` by ``method``.

    ``images``: (N, n_in, H, W) float, normalised as for the model. See the module docstring
    for each method's values and resolution; ``methods_for(model)`` lists the valid methods.
    ``prior``: the run's ``box_prior``, needed by (only) the ``"prior"`` method.
    """
    model = _unwrap(model)
    supported = methods_for(model)
    if method not in supported:
        raise ValueError(f"heatmap method {method!r} is not available for {type(model).__name__}; use one of {supported}")
    n_in, n_out = model.conf.n_in, model.conf.n_out
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_out:
        raise ValueError(f"target={target!r} must be a class index in [0, {n_out})")
    x = _check_images(images, n_in)
    n, _, height, width = x.shape

    if method == "center":
        return center_map(n, height, width)
    if method == "prior":
        if prior is None:
            raise ValueError("the 'prior' method needs the run's box prior (its training split had no boxes)")
        prior = prior.float().cpu()
        if tuple(prior.shape) != (height, width):
            prior = F.interpolate(prior[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        return prior.expand(n, height, width).clone()
    x = x.to(next(model.parameters()).device)
    with _eval_mode(model):
        if method in ("pylon", "cam"):
            with torch.no_grad():
                raw = model(x).heatmap[:, target].float()
            # float64: a float32 sigmoid saturates to exactly 1.0 above a logit of ~17, and a
            # confident model's maxima would then tie and the argmax drift to the first of them.
            maps = torch.sigmoid(raw.double()) if method == "pylon" else _minmax(raw)
        else:
            maps = _gradient_cam(model, x, target, method)
    return maps.cpu()
