"""Model speed at fp32 and at the precision train.py chooses (pylon.device), side by side.

Three models see the same batch: PYLON-R18, PYLON-R50 and a plain ResNet50 classifier (the
avg-pool baseline). Each is timed for inference (eval, no grad) and for a training step
(forward + BCE loss + backward + Adam step) twice: in fp32 (``train.amp=false``) and with
``train.amp=true`` (bf16 autocast + channels_last on CUDA and on CPUs with native bf16; on a
CPU without it the two are the same fp32). Within every round each measurement alternates
over precisions and models, after a warm-up, so machine load drifts affect all alike.

Reported: median seconds per batch, images per second, the amp speed-up (fp32 time / amp
time) per model, and the PYLON-R50 / ResNet50 time ratio at each precision.

    python bench/model_speed.py --batch 16 --size 256 --repeats 5 --threads 2

The last line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pylon.device import Precision, choose_precision, resolve_device  # noqa: E402
from pylon.models import BaselineConfig, PylonConfig  # noqa: E402

MODELS = {
    "pylon_r18": lambda: PylonConfig(n_in=1, n_out=1, backbone="resnet18", weights=None).make_model(),
    "pylon_r50": lambda: PylonConfig(n_in=1, n_out=1, backbone="resnet50", weights=None).make_model(),
    "resnet50": lambda: BaselineConfig(n_in=1, n_out=1, backbone="resnet50", pooling="avg").make_model(),
}
KINDS = {"infer": "inference", "train": "train step"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="input height = width (multiple of 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto' (cuda if available)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    return parser.parse_args()


def make_steps(model: torch.nn.Module, precision: Precision, x: torch.Tensor,
               y: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """Inference and one training step of ``model`` at ``precision``, as train.py runs them."""
    model = precision.layout(model.to(precision.device))
    x = precision.layout(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.needs_loss_scaling)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), precision.autocast():
            model(x)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(x).logits
        scaler.scale(F.binary_cross_entropy_with_logits(logits.float(), y)).backward()
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


def measure(args: argparse.Namespace, precisions: Dict[str, Precision]) -> Dict[str, Dict[str, Dict[str, List[float]]]]:
    """times[precision][model][kind]: one value per timed round."""
    device = next(iter(precisions.values())).device
    torch.manual_seed(1)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 2, (args.batch, 1), device=device).float()
    steps = {}
    for label, precision in precisions.items():
        for name in args.models:
            torch.manual_seed(0)  # the same weights at every precision
            steps[label, name] = make_steps(MODELS[name](), precision, x, y)
    times = {label: {name: {kind: [] for kind in KINDS} for name in args.models} for label in precisions}
    for round_ in range(args.warmup + args.repeats):
        for kind in KINDS:
            for label in precisions:
                for name in args.models:
                    t = timed(steps[label, name][kind], device)
                    if round_ >= args.warmup:
                        times[label][name][kind].append(t)
        print(f"round {round_ + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    return times


def summarize(args: argparse.Namespace, times: dict) -> dict:
    results: dict = {}
    for label, by_model in times.items():
        for name, by_kind in by_model.items():
            for kind, values in by_kind.items():
                med = statistics.median(values)
                results.setdefault(label, {}).setdefault(kind, {})[name] = {
                    "s": round(med, 4), "img_per_s": round(args.batch / med, 2),
                    # well above 1: something else was using the machine
                    "max_over_min": round(max(values) / min(values), 2)}
    for kind in KINDS:
        results.setdefault("amp_speedup", {})[kind] = {
            name: round(results["fp32"][kind][name]["s"] / results["amp"][kind][name]["s"], 2) for name in args.models}
    if {"pylon_r50", "resnet50"} <= set(args.models):
        results["ratio_pylon_r50_over_resnet50"] = {
            label: {kind: round(results[label][kind]["pylon_r50"]["s"] / results[label][kind]["resnet50"]["s"], 3)
                    for kind in KINDS} for label in ("fp32", "amp")}
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    amp = choose_precision(device, SimpleNamespace(amp=True, amp_dtype="auto", channels_last=True))
    precisions = {"fp32": choose_precision(device, SimpleNamespace(amp=False, amp_dtype="auto", channels_last=False)),
                  "amp": amp}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{', '.join(args.models)}: batch {args.batch} at {args.size}x{args.size}, 1 channel, device {name}, "
          f"{args.threads} CPU threads, median of {args.repeats}; amp = {amp.name}")
    results = summarize(args, measure(args, precisions))
    for kind, kind_name in KINDS.items():
        for model in args.models:
            fp32, fast = results["fp32"][kind][model], results["amp"][kind][model]
            spread = max(fp32["max_over_min"], fast["max_over_min"])
            print(f"{kind_name:10s} {model:9s}  fp32 {fp32['s']:.4f} s ({fp32['img_per_s']:.1f} img/s)  "
                  f"amp {fast['s']:.4f} s ({fast['img_per_s']:.1f} img/s)  speed-up "
                  f"{results['amp_speedup'][kind][model]:.2f}x  (slowest/fastest round {spread:.2f})")
            if spread > 1.3:
                print("  warning: times varied by more than 30% between rounds; the machine was probably busy")
    for label, ratios in results.get("ratio_pylon_r50_over_resnet50", {}).items():
        print(f"PYLON-R50 / ResNet50 at {label}: inference {ratios['infer']:.3f}, train step {ratios['train']:.3f}")
    print(json.dumps({"device": name, "threads": args.threads, "batch": args.batch, "size": args.size,
                      "repeats": args.repeats, "torch": torch.__version__, "amp": amp.name, "results": results}))


if __name__ == "__main__":
    main()
