"""Checkpoints: atomic save, safe load, full resume state, weight loading for evaluation."""
from __future__ import annotations

import dataclasses
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pylon.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    load_model_weights,
    restore_training_state,
    save_checkpoint,
    training_state,
)

REPO = Path(__file__).resolve().parents[1]


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 1),
    )


def train_steps(model, optimizer, scaler, n_steps: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n_steps):
        x = torch.randn(4, 1, 8, 8, generator=generator)
        y = torch.randint(0, 2, (4, 1), generator=generator).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ atomic save


def test_failed_serialisation_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(target, {"epoch": 1, "w": torch.arange(5.0)})
    before = target.read_bytes()

    # A lambda cannot be pickled: torch.save fails part-way through writing the temp file.
    with pytest.raises(CheckpointError, match="could not serialise") as info:
        save_checkpoint(target, {"epoch": 2, "w": torch.zeros(1000), "hook": lambda x: x})
    assert str(target) in str(info.value)
    assert target.read_bytes() == before
    assert load_checkpoint(target)["epoch"] == 1
    assert temp_files(target.parent) == []


class NotPlainData:
    """Picklable, but loading it would need this module's code: safe loading refuses it."""

    def __init__(self) -> None:
        self.value = 3


def test_state_that_would_not_load_safely_is_not_published(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"epoch": 1})
    with pytest.raises(CheckpointError, match="would not load safely.*NotPlainData"):
        save_checkpoint(target, {"epoch": 2, "obj": NotPlainData()})
    assert load_checkpoint(target) == {"epoch": 1}
    assert temp_files(tmp_path) == []


def test_numpy_values_and_paths_are_stored_as_plain_types(tmp_path):
    model = small_model()
    metrics = {"auroc": np.float64(0.75), "n": np.int64(12), "curve": np.array([0.5, 1.0])}
    path = save_checkpoint(
        tmp_path / "best.pt",
        {"model": model.state_dict(), "val_metrics": metrics, "root": tmp_path, "epoch": 3},
    )
    saved = load_checkpoint(path)
    assert saved["val_metrics"]["auroc"] == 0.75 and type(saved["val_metrics"]["auroc"]) is float
    assert saved["val_metrics"]["n"] == 12 and type(saved["val_metrics"]["n"]) is int
    torch.testing.assert_close(saved["val_metrics"]["curve"], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert saved["root"] == str(tmp_path)
    assert saved["model"]._metadata == model.state_dict()._metadata  # module versions kept
    load_model_weights(small_model(), path)


# Saves a checkpoint whose pickling blocks, so the parent can kill the writer mid-save.
_KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from pylon.checkpoint import save_checkpoint

class Stall:
    def __reduce__(self):
        Path(sys.argv[2]).write_text("writing")
        time.sleep(60)
        return (int, (0,))

save_checkpoint(sys.argv[1], {"epoch": 2, "w": torch.ones(10), "stall": Stall()})
"""


def test_writer_killed_mid_save_leaves_previous_file_and_next_save_cleans_up(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"epoch": 1, "w": torch.zeros(10)})
    before = target.read_bytes()
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target), str(ready)], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "writer exited before reaching the stall"
            assert time.monotonic() < deadline, "writer never started saving"
            time.sleep(0.05)
        assert len(temp_files(tmp_path)) == 1  # the half-written file is a temp, not the target
    finally:
        proc.kill()
        proc.wait()

    assert target.read_bytes() == before
    assert load_checkpoint(target)["epoch"] == 1
    save_checkpoint(target, {"epoch": 3})
    assert load_checkpoint(target) == {"epoch": 3}
    assert temp_files(tmp_path) == []


# ------------------------------------------------------------------ safe load


def _write_marker(path: str) -> str:
    Path(path).write_text("code from the checkpoint ran")
    return path


class Malicious:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "payload": Malicious(marker)}, evil)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert str(evil) in message
    assert "_write_marker" in message and "refused" in message
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model_weights(nn.Linear(2, 1), evil)
    assert not marker.exists()

    # The file really is dangerous: an unsafe load runs the payload.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_truncated_missing_and_foreign_files_are_refused_clearly(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(2000), "epoch": 4})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)

    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        load_checkpoint(missing)
    assert isinstance(info.value, FileNotFoundError) and str(missing) in str(info.value)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all\n")
    with pytest.raises(CheckpointError, match=str(text)):
        load_checkpoint(text)

    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(a_list)


# ------------------------------------------------------------------ resume state


@dataclasses.dataclass
class Progress:
    """Shaped like a training loop's own progress record."""

    epoch: int = 0
    global_step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    stop_reason: str | None = None
    best_metrics: dict = dataclasses.field(default_factory=dict)


def make_training_objects():
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.2, patience=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scheduler, scaler


def test_round_trip_resumes_training_identically(tmp_path):
    torch.manual_seed(0)
    model, optimizer, scheduler, scaler = make_training_objects()
    train_steps(model, optimizer, scaler, 3, seed=1)
    scheduler.step(1.0)
    scheduler.step(2.0)  # no improvement with patience 0: lr drops to 2e-3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)
    config = {"model": {"backbone": "resnet18"}, "data": {"root": tmp_path}, "lr": 1e-2}
    progress = Progress(epoch=2, global_step=3, best_val_loss=0.5, best_epoch=1,
                        epochs_without_improvement=1, best_metrics={"best_val_auroc": 0.7})
    path = save_checkpoint(
        tmp_path / "last.pt",
        training_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       loop=progress, config=config),
    )
    expected_next = train_steps(model, optimizer, scaler, 2, seed=7)
    expected_params = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(123)  # fresh objects start from different weights
    model2, optimizer2, scheduler2, scaler2 = make_training_objects()
    saved = load_checkpoint(path)
    loop = restore_training_state(
        saved, model=model2, optimizer=optimizer2, scheduler=scheduler2, scaler=scaler2,
        origin=str(path),
    )
    assert Progress(**loop) == progress
    assert saved["config"] == {
        "model": {"backbone": "resnet18"}, "data": {"root": str(tmp_path)}, "lr": 1e-2
    }
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert scheduler2.state_dict()["num_bad_epochs"] == scheduler.state_dict()["num_bad_epochs"]
    assert scheduler2.state_dict()["best"] == 1.0

    assert train_steps(model2, optimizer2, scaler2, 2, seed=7) == expected_next
    for restored, expected in zip(model2.parameters(), expected_params):
        torch.testing.assert_close(restored, expected, rtol=0, atol=0)


def test_rng_restore_reproduces_draws(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # leaves a cached second gaussian in Python's state
    np.random.randn(3)  # odd count: leaves numpy's cached gaussian set
    model = small_model()
    path = save_checkpoint(tmp_path / "rng.pt", training_state(model=model, loop=Progress()))

    def draws():
        return (
            [random.random(), random.gauss(0, 1)],
            np.random.rand(4).tolist() + np.random.randn(1).tolist(),
            torch.rand(4).tolist(),
        )

    expected = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draws() != expected
    loop = restore_training_state(load_checkpoint(path), model=small_model())
    assert draws() == expected
    assert loop["best_val_loss"] == math.inf and loop["stop_reason"] is None


def test_restore_rejects_wrong_optimizer_and_non_training_checkpoint(tmp_path):
    model, optimizer, scheduler, scaler = make_training_objects()
    state = training_state(model=model, optimizer=optimizer, loop=Progress())
    path = save_checkpoint(tmp_path / "a.pt", state)
    with pytest.raises(CheckpointError, match="no scheduler state"):
        restore_training_state(load_checkpoint(path), model=small_model(),
                               scheduler=scheduler, origin=str(path))
    bare = save_checkpoint(tmp_path / "bare.pt", model.state_dict())
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        restore_training_state(load_checkpoint(bare), model=small_model(), origin=str(bare))
    with pytest.raises(ValueError, match="epoch and global_step"):
        training_state(model=model, loop={"epoch": 1})


# ------------------------------------------------------------------ weights for evaluation


def test_load_model_weights_strips_ddp_and_compile_prefixes(tmp_path):
    source = small_model()
    wrapped = {
        "ddp": nn.DataParallel(source),  # same "module." naming as DistributedDataParallel
        "compiled": torch.compile(source),  # never called, so nothing is compiled
    }
    assert all(k.startswith("module.") for k in wrapped["ddp"].state_dict())
    assert all(k.startswith("_orig_mod.") for k in wrapped["compiled"].state_dict())
    nested = {f"_orig_mod.module.{k}": v for k, v in source.state_dict().items()}

    files = {
        "ddp": save_checkpoint(tmp_path / "ddp.pt", wrapped["ddp"].state_dict()),
        "compiled": save_checkpoint(tmp_path / "compiled.pt", wrapped["compiled"].state_dict()),
        "nested": save_checkpoint(tmp_path / "nested.pt", nested),
        # a training checkpoint of a wrapped model stores the plain weights under "model"
        "training": save_checkpoint(
            tmp_path / "train.pt", training_state(model=wrapped["compiled"], loop=Progress())
        ),
    }
    for name, path in files.items():
        target = small_model()
        loaded = load_model_weights(target, path)
        assert loaded is target, name
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value, msg=f"{name}: {key}")
    # the target may itself be wrapped
    target = nn.DataParallel(small_model())
    load_model_weights(target, files["ddp"])
    torch.testing.assert_close(target.module[0].weight, source[0].weight)


def test_load_model_weights_mismatch_lists_keys(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", {"model": small_model().state_dict(), "epoch": 0})
    other = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # 8 channels instead of 4
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
        nn.Linear(1, 1),  # extra layer
    )
    with pytest.raises(CheckpointError) as info:
        load_model_weights(other, path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (2): 6.weight, 6.bias" in message
    assert "shape mismatches" in message
    assert "0.weight (checkpoint (4, 1, 3, 3) vs model (8, 1, 3, 3))" in message
    assert "unexpected keys" not in message

    smaller = small_model()[:3]
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): 5.weight, 5.bias"):
        load_model_weights(smaller, path)
