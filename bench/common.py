"""What the benchmarks share: models from the project's configs, their command line, and jobs timed
in interleaved rounds, so that a drift in the machine's load hits every job alike."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pylon.config import load_config  # noqa: E402


def parser(doc: str, rounds: int = 5) -> argparse.ArgumentParser:
    """--threads, --rounds and --warmup; the description is the docstring's first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds (default {rounds})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    return parser


def model_config(device: str, *overrides: str) -> Any:
    """pylon_r50.yaml (PYLON-R50, the paper recipe) with random weights, changed by ``overrides``."""
    return load_config("pylon_r50.yaml", ["model.weights=null", f"train.device={device}", *overrides])


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """``fn`` as a job that returns the seconds all of it took (on CUDA up to the end of its kernels)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)

    def job() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    return job


def median_seconds(jobs: dict[Hashable, Callable[[], float]], rounds: int, warmup: int) -> dict[Hashable, float]:
    """Each job's median seconds over the timed rounds. A round runs every job once, in an order that
    rotates from round to round."""
    if rounds < 1 or warmup < 0:
        raise SystemExit("--rounds must be at least 1 and --warmup at least 0")
    names, times = list(jobs), {name: [] for name in jobs}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = jobs[name]()
            if round_ >= warmup:
                times[name].append(seconds)
        print(f"round {round_ + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in times.items()}
