"""docs/ARCHITECTURE.md's "Where to add" recipes stay true: every file, test, config key and code
name they mention exists where they say, and the heatmap recipe names every tuple of method names
in pylon/heatmaps.py. Source is read with ast, so nothing heavy is imported."""
from __future__ import annotations

import ast
import dataclasses
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
CONFIG_SECTIONS = ("model", "data", "train", "eval", "logging")
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"


def recipes() -> dict[str, str]:
    """``{title: text}`` for each bullet of the "Where to add" section."""
    section = DOC.read_text().split("## Where to add", 1)[1].split("\n## ", 1)[0]
    bullets = re.split(r"^- ", section, flags=re.M)[1:]
    return {re.match(r"\*\*(.+?)\*\*", b).group(1): " ".join(b.split()) for b in bullets}


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


@lru_cache(maxsize=None)
def defined_names(path: Path) -> frozenset[str]:
    """Module-level functions, classes and assigned names of ``path``, and ``Class.attr`` for each
    class's fields, methods and ``self.attr`` assignments."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()

    def targets(node: ast.AST) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return list(node.targets)
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            return [node.target]
        return []

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        names.update(t.id for t in targets(node) if isinstance(t, ast.Name))
        if isinstance(node, ast.ClassDef):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{inner.name}")
                for t in targets(inner):
                    if isinstance(t, ast.Name):
                        names.add(f"{node.name}.{t.id}")
                    elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        names.add(f"{node.name}.{t.attr}")
    return frozenset(names)


def module_file(name: str) -> Path | None:
    """``heatmaps`` -> pylon/heatmaps.py, ``models`` -> pylon/models/__init__.py, ``train`` ->
    train.py, ``pylon`` -> pylon/__init__.py; None if no such module."""
    for candidate in (ROOT / "pylon" / f"{name}.py", ROOT / "pylon" / name / "__init__.py", ROOT / f"{name}.py",
                      ROOT / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def config_fields() -> dict[str, dict]:
    """``{section: {field: nested dict or None}}`` of ExperimentConfig, read from pylon/config.py."""
    import pylon.config as config

    def walk(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = walk(type(default)) if dataclasses.is_dataclass(default) else None
        return out

    return walk(config.ExperimentConfig)


def is_config_key(span: str) -> bool:
    return span.split(".")[0] in CONFIG_SECTIONS and not span.endswith(".py")


def files_named(text: str) -> list[Path]:
    """The Python files a recipe names: paths (a ``<name>`` part stands for every file there), folders
    (every file in them), bare file names found in one of those folders, and modules of dotted names."""
    files: list[Path] = []
    folders: list[Path] = []
    for span in code_spans(text):
        path = span.split("::")[0]
        if is_config_key(span):
            continue
        if "/" in path:
            if "<" in path:
                files += [p for p in (ROOT / path).parent.glob("*.py") if p.name != "__init__.py"]
            elif (ROOT / path).is_dir():
                folders.append(ROOT / path)
                files += sorted((ROOT / path).rglob("*.py"))
            elif path.endswith(".py"):
                files.append(ROOT / path)
        elif re.fullmatch(rf"{IDENTIFIER}\.{IDENTIFIER}.*", span) and module_file(span.split(".")[0]):
            files.append(module_file(span.split(".")[0]))
    folders += [ROOT] + [p.parent for p in files]  # a bare file name: at the top, or beside a named file
    for span in code_spans(text):
        if re.fullmatch(rf"{IDENTIFIER}\.py", span):
            files += [folder / span for folder in folders if (folder / span).is_file()]
    return list(dict.fromkeys(files))


RECIPES = recipes()


def test_the_doc_has_the_recipes():
    assert {"A data source", "A config key", "A backbone", "A model", "A heatmap method", "A metric"} <= set(RECIPES)


@pytest.mark.parametrize("title", sorted(RECIPES))
def test_every_name_a_recipe_gives_exists_where_it_says(title):
    text = RECIPES[title]
    files = files_named(text)
    fields = config_fields()
    wrong = []
    for span in code_spans(text):
        name = span.split("(")[0].strip()
        path, _, test_name = span.partition("::")
        if "/" in path:  # a file or folder; a <name> part stands for a new file in an existing folder
            target = ROOT / path
            exists = target.parent.is_dir() if "<" in path else target.exists()
            if test_name:
                exists = exists and test_name in defined_names(target)
            if not exists:
                wrong.append(span)
        elif re.fullmatch(rf"{IDENTIFIER}\.py", span):  # a file name: in a folder the recipe names
            if not any(f.name == span for f in files):
                wrong.append(span)
        elif is_config_key(name):  # data.roots.<name>, eval.methods
            node = fields
            for part in name.split("."):
                if "<" in part:
                    break
                if not isinstance(node, dict) or part not in node:
                    wrong.append(span)
                    break
                node = node[part]
        elif re.fullmatch(rf"{IDENTIFIER}(\.{IDENTIFIER})+", name) and module_file(name.split(".")[0]):
            module, _, attr = name.partition(".")  # heatmaps.methods_for, pylon.PylonError
            if attr not in defined_names(module_file(module)):
                wrong.append(span)
        elif re.fullmatch(rf"{IDENTIFIER}(\.{IDENTIFIER})?", name) and (
                name.isupper() or "_" in name or name[0].isupper() or "(" in span):
            # a code name (constant, function, class, Class.attr): defined in a file the recipe names
            if not any(name in defined_names(f) for f in files if f.is_file()):
                wrong.append(span)
    assert wrong == [], f"{title!r} names what is not there: {wrong} (files it names: " \
                        f"{[str(f.relative_to(ROOT)) for f in files]})"


def method_tuples() -> dict[str, tuple[str, ...]]:
    """Module-level tuples of heatmap method names in pylon/heatmaps.py."""
    tree = ast.parse((ROOT / "pylon" / "heatmaps.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            value = ast.literal_eval(node.value)
            if value and all(isinstance(v, str) for v in value):
                found.update({t.id: value for t in node.targets if isinstance(t, ast.Name)})
    return found


def test_the_heatmap_recipe_names_every_tuple_of_method_names():
    tuples = method_tuples()
    assert {"PYLON_METHODS", "BASELINE_METHODS", "METHODS"} <= set(tuples)
    spans = set(code_spans(RECIPES["A heatmap method"]))
    assert sorted(set(tuples) - spans) == [], "pylon/heatmaps.py lists method names in a tuple the recipe omits"


def test_methods_lists_every_method_of_every_model():
    """What config.validate accepts for eval.methods is exactly what the models support."""
    tuples = method_tuples()
    assert set(tuples["METHODS"]) == set(tuples["PYLON_METHODS"]) | set(tuples["BASELINE_METHODS"])
    assert len(set(tuples["METHODS"])) == len(tuples["METHODS"])
    for name in ("PYLON_METHODS", "BASELINE_METHODS"):
        assert tuples[name][-2:] == ("prior", "center"), f"{name}: the image-blind methods come last"


def test_the_reference_config_lists_every_key():
    """The config-key recipe: configs/pylon_r50.yaml lists every key of the schema."""
    raw = yaml.safe_load((ROOT / "configs" / "pylon_r50.yaml").read_text())

    def missing(schema: dict, given: dict, prefix: str = "") -> list[str]:
        out = []
        for key, sub in schema.items():
            if key not in given:
                out.append(prefix + key)
            elif sub is not None:
                out += missing(sub, given[key] or {}, f"{prefix}{key}.")
        return out

    assert missing(config_fields(), raw) == []
