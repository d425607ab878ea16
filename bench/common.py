"""What the benchmarks share: models from the project's configs, their command line, and jobs timed
in interleaved rounds, so that a drift in the machine's load hits every job alike."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pylon.config import load_config  # noqa: E402

Job = Callable[[], float]  # runs once, returns the seconds it measured


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


def timed(fn: Callable[[], object], device: torch.device) -> Job:
    """``fn`` as a job that measures all of it (on CUDA up to the end of its kernels)."""
    def job() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return job


def interleaved(jobs: dict[str, Job], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each job's seconds in every timed round. A round runs every job once, in an order that
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
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}

