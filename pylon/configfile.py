"""Config files on disk: a name looked up in ``configs/`` (or another folder), and a YAML file read
with the files it ``extends:`` merged underneath; each error is one line naming the file."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import yaml
from omegaconf import DictConfig, OmegaConf

from pylon import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: Union[str, Path], folder: Path = CONFIG_DIR, what: str = "config file") -> Path:
    """A path as given if it exists, else a bare name looked up in ``folder`` (``configs/``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (folder / path, folder / f"{path}.yaml"):
        if len(path.parts) == 1 and candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.name for p in folder.glob("*.yaml")))
    raise ConfigError(f"{what} not found: {name_or_path} ({folder.relative_to(CONFIG_DIR.parent)}/ has: {known})")


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """One YAML file, with ``extends: other.yaml`` merged underneath it."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    parent = raw.pop("extends", None)
    names = [] if parent is None else parent if isinstance(parent, list) else [parent]
    if parent is not None and not (names and all(isinstance(name, str) and name for name in names)):
        raise ConfigError(f"{path}: 'extends' takes a file name or a list of file names, got {parent!r}")
    layers = []
    for name in names:  # merged in order: a later file's keys win
        parent_path = path.parent / name
        if parent_path.is_dir():
            raise ConfigError(f"{path}: extends {parent_path}, which is a folder; name a config file")
        if not parent_path.is_file():
            raise ConfigError(f"{path}: extends a file that does not exist: {parent_path}")
        layers.append(read_yaml(parent_path, seen + (path.resolve(),)))
    return OmegaConf.merge(*layers, OmegaConf.create(raw))
