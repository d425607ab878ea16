"""Every heatmap the project scores: ``heatmaps(model, images, method)`` -> (N, h, w) CPU maps in
[0, 1] of class 0, at the method's own resolution, computed in eval mode:

* ``pylon``: sigmoid of PYLON's logits, 1/4 size (the decoder's default), at the caller's precision (its head stays fp32).
* ``cam``: the baseline's class map, min-max scaled (not a sigmoid: CAM values are uncalibrated
  logits, and an affine rescale keeps the upsampled argmax), 1/32 size (1/16 at encoder depth 4), in fp32.
* ``gradcam`` / ``gradcam++``: pytorch-grad-cam on ``target_layer`` for the raw logit, whose gradient
  ignores its sign: images called negative still get the evidence *for* the class; input size.
* ``center``: a cone peaking at the image centre; ``prior``: the training split's mean box mask.

An ``Ensemble``'s maps are its members' mean. Gradient methods work under ``torch.no_grad``/
``inference_mode`` and leave every ``.grad`` None: do not call them between a training step's
backward and its step.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pylon import ConfigError
from pylon.device import Precision
from pylon.metrics import box_mask, upsample
from pylon.models import BaselineClassifier, Ensemble, Pylon, unwrap

# The image-blind baselines come last: every model gets them.
PYLON_METHODS = ("pylon", "prior", "center")
BASELINE_METHODS = ("cam", "gradcam", "gradcam++", "prior", "center")
METHODS = ("pylon", "cam", "gradcam", "gradcam++", "prior", "center")


def methods_for(model: nn.Module) -> List[str]:
    """Every heatmap method ``model`` supports, in reporting order."""
    model = unwrap(model)
    if isinstance(model, Ensemble):
        model = model.members[0]
    assert isinstance(model, (Pylon, BaselineClassifier)), type(model)
    return list(PYLON_METHODS if isinstance(model, Pylon) else BASELINE_METHODS)


def resolve_methods(model: nn.Module, requested: Sequence[str], has_prior: bool = True) -> list[str]:
    """``eval.methods`` (all the model supports when empty), always with the prior and center floors."""
    supported = [m for m in methods_for(model) if has_prior or m != "prior"]
    unknown = [m for m in requested if m not in supported]
    if unknown:
        raise ConfigError(f"eval.methods: {unknown} not available for this {type(model).__name__} run; it supports {supported}")
    return list(dict.fromkeys([*requested, *[m for m in ("prior", "center") if m in supported]])) if requested else supported


def box_prior(boxes: Sequence[Sequence[Sequence[float]]], image_size: int) -> Optional[torch.Tensor]:
    """(S, S) float32 mean box mask of the images with boxes (None if none has), in the input frame."""
    masks = [box_mask(b, (image_size, image_size)) for b in boxes if len(b)]
    return torch.from_numpy(np.mean(masks, axis=0, dtype=np.float64).astype(np.float32)) if masks else None


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


def _gradient_cam(model: BaselineClassifier, x: torch.Tensor, method: str) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with torch.inference_mode(False), torch.enable_grad():
        # Inference tensors cannot enter a graph; a plain copy can.
        x = x.clone() if x.is_inference() else x.detach()
        cam = cam_class(model=_Logits(model), target_layers=[model.target_layer])
        # Differentiate w.r.t. the input too: the target layer's output is then in the graph with a frozen encoder.
        cam.compute_input_gradient = True
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * x.shape[0])
        finally:
            # Not the context manager: its __exit__ swallows IndexError.
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
    return torch.from_numpy(maps).float()


def heatmaps(model: nn.Module, images: torch.Tensor, method: str, prior: Optional[torch.Tensor] = None,
             precision: Optional[Precision] = None) -> torch.Tensor:
    """(N, h, w) CPU heatmaps of normalised ``images`` (N, n_in, H, W) by one of ``methods_for(model)``;
    ``prior``: the run's ``box_prior`` ("prior" only); ``precision``: PYLON's forward pass's (default fp32)."""
    model = unwrap(model)
    assert method in methods_for(model), (method, type(model).__name__)
    n, _, height, width = images.shape
    if method == "center":  # a cone from 1 at the centre to 0 at the corners, peaking at the pixel nearest the centre
        ys, xs = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2.0 for size in (height, width))
        dist = torch.hypot(ys[:, None], xs[None, :])
        return (1.0 - dist / dist.max().clamp_min(1e-12)).expand(n, height, width).clone()
    if method == "prior":
        if prior is None:
            raise ValueError("the 'prior' method needs the run's box prior (its training split had no boxes)")
        return upsample(prior.float().cpu()[None], height, width).expand(n, height, width).clone()
    if isinstance(model, Ensemble):
        return torch.stack([heatmaps(member, images, method, prior, precision) for member in model.members]).mean(0)
    precision = precision or Precision(next(model.parameters()).device)
    x = precision.layout(images.to(precision.device))
    # Restore each submodule's own flag afterwards: a frozen encoder stays in eval while the rest trains.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        if method in ("pylon", "cam"):
            # CAM-style maps are computed in fp32: the baseline's 4x4 to 8x8 maps tie easily, and
            # bf16 features moved one of 32 demo CAM peaks (PYLON's: none of 32).
            with torch.no_grad(), (precision.autocast() if method == "pylon" else contextlib.nullcontext()):
                raw = model(x).heatmap[:, 0].float()
            # float64: a float32 sigmoid saturates to 1.0 above a logit of ~17, and the argmax of
            # a confident model's map would drift to the first of the tied maxima.
            maps = torch.sigmoid(raw.double()) if method == "pylon" else _minmax(raw)
        else:
            maps = _gradient_cam(model, x, method)
    finally:
        for module, training in flags:
            module.training = training
    return maps.cpu()
