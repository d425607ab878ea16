"""PYLON (Preechakul et al., "Improved image classification explainability with high-accuracy
heatmaps", iScience 2022): an encoder, a pyramid-attention decoder and a head whose per-pixel
logits (at 1/4 of the input) are the heatmap; the image logit is the heatmap's max. With a ResNet
encoder, parameter counts and (at inputs that are multiples of 256) the computation match the
authors' code; any multiple of 32 works here. Checkpoint names: ``encoder``, ``decoder.attention``,
``decoder.ups.{0,1,2}`` (adding the 1/16, 1/8, 1/4 features), ``head``. A shallower encoder
(``encoder_depth`` 4: attention on the 1/16 features, UP modules adding 1/8 and 1/4) is the same
model at half the input size, for a quick run at 128 px that sees the film as 256 px does."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.initialization import initialize_decoder, initialize_head
from torch import nn
from torchvision.ops import Conv2dNormActivation

from .backbone import EncoderModel, ModelOutput, WeightsSpec


@dataclass
class PylonConfig:
    """Hyper-parameters of PYLON (names as in the original code), validated by pylon.config.
    ``pretrain``: a whole-model checkpoint loaded after construction (``weights`` not fetched)."""

    n_in: int
    n_out: int
    backbone: str = "resnet50"  # any segmentation-models-pytorch encoder
    encoder_depth: int = 5  # stages: 5 ends at 1/32 of the input, 4 at 1/16, 3 at 1/8
    weights: WeightsSpec = "imagenet"  # encoder initialisation: None, "imagenet", a local file or a run (+ decoder)
    n_dec_ch: int = 128  # channels of every decoder feature map
    n_up: int = 3  # UP modules: at depth 5, 3 gives a 1/4 resolution heatmap, 0 a 1/32 one
    seg_kern_size: int = 1  # prediction head kernel size (odd)
    use_pa: bool = True  # pyramid attention on the 1/32 features
    up_type: str = "2layer"  # skip projection: '1layer' (1 conv) or '2layer' (2 convs)
    up_kernel_size: int = 1  # kernel size of the skip projection convs (odd)
    freeze: Optional[str] = None  # 'enc': freeze the encoder (weights and BN statistics); 'bn': its BN statistics only
    pretrain: Optional[str] = None

    def make_model(self) -> "Pylon":
        return Pylon(self)


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int) -> Conv2dNormActivation:
    # The conv keeps its bias although BN follows: the original model has it (parameter parity).
    return Conv2dNormActivation(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=True)


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class PyramidAttention(nn.Module):
    """Attention on the coarsest features: a 1x1 projection of the features, multiplied by
    a one-channel map built from a 3-level max-pool pyramid (7x7, 5x5, 3x3 convs going
    down, merged coming back up)."""

    def __init__(self, in_ch: int, out_ch: int, use_pa: bool = True):
        super().__init__()
        self.use_pa = use_pa
        self.project = conv_bn_relu(in_ch, out_ch, 1)
        if use_pa:
            self.down1 = conv_bn_relu(in_ch, 1, 7)
            self.down2 = conv_bn_relu(1, 1, 5)
            self.down3 = conv_bn_relu(1, 1, 3)
            self.lateral1 = conv_bn_relu(1, 1, 7)
            self.lateral2 = conv_bn_relu(1, 1, 5)
            self.lateral3 = conv_bn_relu(1, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x)
        if not self.use_pa:
            return projected
        # The original halves the map three times and doubles it back, so the levels only meet
        # when the 1/32 map is a multiple of 8 (inputs a multiple of 256). Ceil-mode pooling and
        # upsampling to the exact size of the level above meet at any size, and change nothing
        # at multiples of 8 (ceil == floor; align_corners upsampling to 2n == by a factor of 2).
        # The pyramid runs in float32 even under autocast. Its maps are tiny and cheap, and
        # oneDNN's bf16 weight gradient of the wide 7x7 conv is wrong (and varies run to run)
        # on maps under 3x3: the 1/64 level of inputs under 160 px (128 px at encoder depth 5 gives 2x2).
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            d1 = self.down1(F.max_pool2d(x, 2, ceil_mode=True))
            d2 = self.down2(F.max_pool2d(d1, 2, ceil_mode=True))
            d3 = self.down3(F.max_pool2d(d2, 2, ceil_mode=True))
            attn = upsample_to(self.lateral3(d3), d2.shape[-2:])
            attn = upsample_to(self.lateral2(d2) + attn, d1.shape[-2:])
            attn = upsample_to(self.lateral1(d1) + attn, x.shape[-2:])
        return attn * projected


class UpBlock(nn.Module):
    """Upsamples the coarse decoder map to a skip feature's size and adds the skip feature
    projected to the decoder width ('2layer': keep width, then project; '1layer': project)."""

    def __init__(self, skip_ch: int, out_ch: int, up_type: str = "2layer", kernel_size: int = 1):
        super().__init__()
        first = [conv_bn_relu(skip_ch, skip_ch, kernel_size)] if up_type == "2layer" else []
        self.skip = nn.Sequential(*first, conv_bn_relu(skip_ch, out_ch, kernel_size))

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return upsample_to(coarse, skip.shape[-2:]) + self.skip(skip)


class PylonDecoder(nn.Module):
    def __init__(self, encoder_channels: Sequence[int], conf: PylonConfig):
        super().__init__()
        self.attention = PyramidAttention(encoder_channels[-1], conf.n_dec_ch, use_pa=conf.use_pa)
        # At depth 5 ups[0] takes the 1/16 features, ups[1] the 1/8, ups[2] the 1/4.
        self.ups = nn.ModuleList(UpBlock(encoder_channels[-2 - i], conf.n_dec_ch, conf.up_type, conf.up_kernel_size)
                                 for i in range(conf.n_up))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # oneDNN's CPU convolutions are faster on channels-last tensors: it cut this decoder's
        # forward+backward by about a quarter on CPU (a no-op when the input already is).
        features = [f.contiguous(memory_format=torch.channels_last) for f in features[-1 - len(self.ups):]]
        x = self.attention(features[-1])
        for i, up in enumerate(self.ups):
            x = up(features[-2 - i], x)
        return x


# Names of the original implementation (its ``net.`` submodule) -> ours: its checkpoints can be ``pretrain``.
_REFERENCE_KEY_RULES = (
    (r"^net\.encoder\.", "encoder."),
    (r"^net\.segmentation_head\.0\.", "head."),
    (r"^net\.decoder\.pa\.mid\.0\.", "decoder.attention.project."),
    (r"^net\.decoder\.pa\.down(\d)\.1\.", r"decoder.attention.down\1."),
    (r"^net\.decoder\.pa\.conv(\d)\.", r"decoder.attention.lateral\1."),
    (r"^net\.decoder\.up3\.conv1\.", "decoder.ups.0.skip."),
    (r"^net\.decoder\.up2\.conv1\.", "decoder.ups.1.skip."),
    (r"^net\.decoder\.up1\.conv1\.", "decoder.ups.2.skip."),
)


def translate_reference_keys(state: dict) -> dict:
    """A state dict saved by the original PYLON code, in this module's names (ours: unchanged)."""
    if not any(key.startswith("net.") for key in state):
        return state
    out = {}
    for key, value in state.items():
        for pattern, repl in _REFERENCE_KEY_RULES:  # at most one matches: each takes the "net." away
            key = re.sub(pattern, repl, key)
        if key.startswith("decoder."):
            # ConvBnRelu(conv, bn) -> Conv2dNormActivation(0: conv, 1: bn); '1layer' skips are a
            # bare ConvBnRelu there, a 1-element Sequential here.
            key = key.replace(".conv.", ".0.").replace(".bn.", ".1.")
            key = re.sub(r"(decoder\.ups\.\d\.skip\.)(?=[01]\.(weight|bias|running_|num_batches))", r"\g<1>0.", key)
        out[key] = value
    return out


class Pylon(EncoderModel):
    """``forward(x)`` -> ``ModelOutput(logits (N, n_out), heatmap (N, n_out, H/4, W/4))``."""

    head_prefixes = ("decoder.", "head.")
    translate_keys = staticmethod(translate_reference_keys)

    def build_head(self, conf: PylonConfig) -> None:
        self.decoder = PylonDecoder(self.encoder.out_channels, conf)
        self.head = nn.Conv2d(conf.n_dec_ch, conf.n_out, conf.seg_kern_size, padding=conf.seg_kern_size // 2)
        # Same initialisation as smp segmentation models (and the original PYLON).
        initialize_decoder(self.decoder)
        initialize_head(self.head)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        decoded = self.decoder(self.encoder(x))
        # The 1x1 head runs in float32 even under autocast: in bf16 (8-bit mantissa) neighbouring
        # logits would tie, rounding the max-pooled logit and moving the map's peak.
        with torch.autocast(x.device.type, enabled=False):
            heatmap = self.head(decoded.float()).contiguous()
        return ModelOutput(logits=heatmap.amax(dim=(-2, -1)), heatmap=heatmap)
