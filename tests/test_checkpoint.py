"""Checkpoints: atomic saves, safe and checked loads, strict weight loading."""
from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pylon.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint

REPO = Path(__file__).resolve().parents[1]

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


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_and_a_failed_save_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ckpt" / "last.pt"
    state = {"model": nn.Linear(3, 1).state_dict(), "loop": {"epoch": 1, "best": 0.5, "reason": None}}
    save_checkpoint(target, state)
    loaded = load_checkpoint(target)
    assert loaded["loop"] == state["loop"] and torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    before = target.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):  # which one depends on the Python version
        save_checkpoint(target, {"unpicklable": lambda: 0})
    assert target.read_bytes() == before and temp_files(target.parent) == []


def test_writer_killed_mid_save_leaves_the_previous_file(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"epoch": 1, "w": torch.zeros(10)})
    before = target.read_bytes()
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(ready)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer never reached the stall"
            time.sleep(0.05)
        assert len(temp_files(tmp_path)) == 1  # the half-written file is a temporary, not the target
    finally:
        proc.kill()
        proc.wait()
    assert target.read_bytes() == before and load_checkpoint(target)["epoch"] == 1


def _write_marker(path: str) -> str:
    Path(path).write_text("code from the checkpoint ran")
    return path


class Malicious:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker, evil = tmp_path / "marker.txt", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "payload": Malicious(marker)}, evil)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert message.startswith(f"{evil}: refused, it holds Python code") and "_write_marker" in message
    assert "weights_only" not in message and "damaged" not in message
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is dangerous: an unsafe load runs it
    assert marker.exists()


def test_damaged_missing_and_foreign_files_are_refused_clearly(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(20000), "epoch": 4})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {truncated: "damaged or not a checkpoint", tmp_path / "nope.pt": "does not exist",
             tmp_path / "notes.pt": "damaged or not a checkpoint", tmp_path / "list.pt": "holds a list"}
    (tmp_path / "notes.pt").write_text("not a checkpoint at all\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for path, reason in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)


def test_weights_load_strictly_through_ddp_and_compile_prefixes():
    source, target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    load_weights(target, wrapped, "ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    other = {**source.state_dict(), "extra.weight": torch.ones(1)}
    other.pop("1.bias")
    other["0.weight"] = torch.ones(4, 2)
    with pytest.raises(CheckpointError) as info:
        load_weights(target, other, "ckpt.pt")
    message = str(info.value)
    assert message.startswith("ckpt.pt: weights do not fit")
    assert "missing (1): 1.bias" in message and "unexpected (1): extra.weight" in message
    assert "shape mismatch (1): 0.weight" in message


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):  # what torch raises when a write hits ENOSPC
        Path(args[1]).write_bytes(b"PK")  # the temporary file it had begun
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1472 vs 1366")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError, match="enforce fail"):
        save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(3)})
    assert temp_files(tmp_path) == [] and not (tmp_path / "last.pt").exists()
