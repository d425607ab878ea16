"""Model speed at fp32 and at the precision train.py chooses (pylon.device), side by side.

PYLON-R18, PYLON-R50 and a ResNet50 classifier (the avg-pool baseline) from pylon_r50.yaml with random weights
see the same batch, timed for inference (pylon.inference.probabilities) and train.py's optimizer step
(pylon.engine.train_step) with train.amp=false (fp32) and train.amp=true (bf16 autocast + channels_last on CUDA
and on CPUs with native bf16; elsewhere fp32 again) in interleaved rounds. The last line is one JSON object.

    python bench/model_speed.py --batch 16 --size 256 --rounds 5 --threads 2
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from common import median_seconds, model_config, parser, timed
from pylon.device import choose_precision, resolve_device
from pylon.distributed import Dist
from pylon.engine import train_step
from pylon.inference import probabilities
from pylon.models import build_model
from pylon.optim import build_loss, build_optimizer

MODELS = {"pylon_r18": ["model.backbone=resnet18"], "pylon_r50": [], "resnet50": ["model.arch=baseline"]}
KINDS = ("infer", "train")


def steps(name: str, amp: bool, batch: dict, device: torch.device) -> dict[str, Callable[[], object]]:
    """Inference and one training step of model ``name`` as train.py and evaluate.py run them."""
    cfg = model_config(str(device), f"train.amp={amp}", *MODELS[name])
    precision = choose_precision(device, cfg.train)
    torch.manual_seed(0)  # the same weights at both precisions
    model = precision.layout(build_model(cfg.model).to(device))
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_loss_scaling)
    d, loss_fn = Dist(device=device), build_loss(cfg.train, 0.5, device)  # random labels, half positive
    return {"infer": lambda: (model.eval(), probabilities(model, batch["image"], precision)),
            "train": lambda: (model.train(), train_step(model, batch, optimizer, loss_fn, scaler, d, cfg.train))}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="input height = width (multiple of 32)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    amp = choose_precision(device, model_config(str(device)).train).name
    torch.manual_seed(1)
    batch = {"image": torch.randn(args.batch, 1, args.size, args.size, device=device),
             "label": torch.randint(0, 2, (args.batch, 1), device=device).float()}
    jobs = {(kind, name, precision): timed(fn, device) for precision, on in (("fp32", False), ("amp", True))
            for name in args.models for kind, fn in steps(name, on, batch, device).items()}
    print(f"{', '.join(args.models)}: batch {args.batch} at {args.size} px, device {device}, {args.threads} CPU "
          f"threads, median of {args.rounds} rounds; amp = {amp}")
    s = median_seconds(jobs, args.rounds, args.warmup)
    speedup = {kind: {name: round(s[kind, name, "fp32"] / s[kind, name, "amp"], 2) for name in args.models}
               for kind in KINDS}
    for kind in KINDS:
        for name in args.models:
            fp32, fast = s[kind, name, "fp32"], s[kind, name, "amp"]
            print(f"{kind:5s} {name:9s}  fp32 {fp32:.4f} s ({args.batch / fp32:.1f} img/s)  amp {fast:.4f} s "
                  f"({args.batch / fast:.1f} img/s)  speed-up {speedup[kind][name]:.2f}x")
    ratio = {}
    if {"pylon_r50", "resnet50"} <= set(args.models):
        ratio = {p: {kind: round(s[kind, "pylon_r50", p] / s[kind, "resnet50", p], 3) for kind in KINDS}
                 for p in ("fp32", "amp")}
        for p, r in ratio.items():
            print(f"PYLON-R50 / ResNet50 at {p}: inference {r['infer']:.3f}, train step {r['train']:.3f}")
    print(json.dumps({"device": str(device), "threads": args.threads, "batch": args.batch, "size": args.size,
                      "rounds": args.rounds, "torch": torch.__version__, "amp": amp, "amp_speedup": speedup,
                      "seconds": {" ".join(key): round(v, 4) for key, v in s.items()},
                      "ratio_pylon_r50_over_resnet50": ratio}))


if __name__ == "__main__":
    main()
