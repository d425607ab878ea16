"""Speed of PYLON-R50 against a plain ResNet50 classifier (the avg-pool baseline).

Both models see the same batch; their measurements alternate (PYLON, ResNet50, PYLON, ...)
after a warm-up, so machine load drifts affect both alike. Reported: median seconds per
batch for inference (eval, no grad) and for a training step (forward + BCE loss + backward
+ Adam step), images per second, and the PYLON/ResNet50 time ratio. On CUDA the same is
repeated with autocast (bf16 where supported, else fp16) and channels_last.

    python bench/model_speed.py --batch 8 --size 256 --repeats 5 --threads 2

The last line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pylon.models import BaselineConfig, PylonConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="input height = width (multiple of 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto' (cuda if available)")
    return parser.parse_args()


def build_models(device: torch.device, channels_last: bool) -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {
        "pylon_r50": PylonConfig(n_in=1, n_out=1, backbone="resnet50", weights=None).make_model(),
        "resnet50": BaselineConfig(n_in=1, n_out=1, backbone="resnet50", pooling="avg").make_model(),
    }
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {name: m.to(device=device, memory_format=fmt) for name, m in models.items()}


def make_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype) -> Dict[str, Callable[[], None]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = (lambda: torch.autocast(x.device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    # fp16 needs loss scaling to train; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp_dtype == torch.float16)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            model(x)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.binary_cross_entropy_with_logits(model(x).logits, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return {"infer": infer, "train": train_step}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_setting(args, device: torch.device, amp_dtype, channels_last: bool) -> dict:
    models = build_models(device, channels_last)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch, 1), device=device).float()
    steps = {name: make_steps(m, x, y, amp_dtype) for name, m in models.items()}

    times: Dict[str, Dict[str, List[float]]] = {n: {"infer": [], "train": []} for n in models}
    for round_ in range(args.warmup + args.repeats):
        for kind in ("infer", "train"):
            for name in models:  # alternate the two models within every round
                t = timed(steps[name][kind], device)
                if round_ >= args.warmup:
                    times[name][kind].append(t)

    result = {}
    for kind in ("infer", "train"):
        med = {name: statistics.median(times[name][kind]) for name in models}
        # max/min over the timed rounds: well above 1 means something else was using the machine.
        spread = max(max(times[n][kind]) / min(times[n][kind]) for n in models)
        result[kind] = {
            **{f"{name}_s": round(med[name], 4) for name in models},
            **{f"{name}_img_per_s": round(args.batch / med[name], 2) for name in models},
            "ratio_pylon_over_resnet50": round(med["pylon_r50"] / med["resnet50"], 3),
            "max_over_min": round(spread, 2),
        }
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    settings = [("fp32", None, False)]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        settings.append((f"amp_{str(amp).split('.')[-1]}_channels_last", amp, True))

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads, "batch": args.batch, "size": args.size,
        "repeats": args.repeats, "torch": torch.__version__, "results": {},
    }
    print(f"PYLON-R50 vs ResNet50 (avg pool), batch {args.batch} at {args.size}x{args.size}, 1 channel, "
          f"device {report['device']}, {args.threads} CPU threads, median of {args.repeats}")
    for label, amp_dtype, channels_last in settings:
        res = run_setting(args, device, amp_dtype, channels_last)
        report["results"][label] = res
        for kind, name in (("infer", "inference"), ("train", "train step")):
            r = res[kind]
            print(f"[{label}] {name:10s}  PYLON {r['pylon_r50_s']:.4f} s ({r['pylon_r50_img_per_s']:.1f} img/s)  "
                  f"ResNet50 {r['resnet50_s']:.4f} s ({r['resnet50_img_per_s']:.1f} img/s)  "
                  f"ratio {r['ratio_pylon_over_resnet50']:.3f}  (slowest/fastest round {r['max_over_min']:.2f})")
            if r["max_over_min"] > 1.3:
                print(f"  warning: {name} times varied by more than 30% between rounds; the machine "
                      f"was probably busy, rerun for trustworthy figures")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
