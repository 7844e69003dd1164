"""Imports run one way only (docs/architecture.md): each room of januskit may import its own room and
the rooms below it, never one beside it or above it, function-level imports included. Checked from the
source with `ast`, so a cycle cannot hide behind a lazy import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "januskit"

# Lowest first; rooms on one line are peers and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("config",),
    ("models", "processing"),
    ("checkpoint", "sampling"),
    ("pipelines", "quantization"),  # quantization: QuantLinear layers, streaming quantised load and save
    ("",),  # the package root, januskit/__init__.py: load() reads a folder and builds its pipeline
    ("world",),
    ("train", "eval"),
    ("recipes",),
    ("serving",),
    ("cli",),  # the command line starts every job, the server included
]
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str:
    """'januskit.train.data.loader' -> 'train'; 'januskit' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path = PKG) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PKG) -> list[tuple[int, str]]:
    """(line, absolute module) for every januskit import in the file, at any depth of the tree."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "januskit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "januskit":
                continue
            if node.module is None or target == "januskit":
                # `from . import x` / `from januskit import x`: x may be a submodule (its own room)
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def violations(root: Path = PKG) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        here = room_of(module_name(path, root))
        for line, target in imported_modules(path, root):
            there = room_of(target)
            if there not in LEVEL:  # `from januskit import __version__` and the like: the root
                there = ""
            if there == here:
                continue
            if LEVEL[there] >= LEVEL[here]:
                kind = "beside" if LEVEL[there] == LEVEL[here] else "above"
                found.append(f"{path.relative_to(root.parent)}:{line}: room {here or '(root)'!r} imports "
                             f"{target} from the room {there or '(root)'!r} {kind} it")
    return found


def test_every_room_is_placed() -> None:
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert rooms - {"assets"} <= set(LEVEL), f"rooms missing from LAYERS: {sorted(rooms - set(LEVEL))}"


def test_imports_run_one_way() -> None:
    assert violations() == []


def test_the_check_sees_upward_and_lazy_imports(tmp_path: Path) -> None:
    # The rule's own test: a lazy upward import and a peer import are both reported, a downward one is not.
    pkg = tmp_path / "januskit"
    for room in ("models", "eval", "train", "config"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "m.py").write_text("def f():\n    from ..eval import world\n")
    (pkg / "train" / "t.py").write_text("from januskit.eval.world import x\nfrom ..models import m\n")
    (pkg / "config" / "__init__.py").write_text("import januskit.models.m\n")
    found = violations(pkg)
    assert len(found) == 3, found
    assert "januskit/models/m.py:2: room 'models' imports januskit.eval from the room 'eval' above it" in found
    assert "januskit/train/t.py:1: room 'train' imports januskit.eval.world from the room 'eval' beside it" in found
    assert any(f.startswith("januskit/config/__init__.py:1:") for f in found)


@pytest.mark.parametrize("module,room", [("januskit", ""), ("januskit.train.data.loader", "train"),
                                         ("januskit.cli", "cli")])
def test_room_of(module: str, room: str) -> None:
    assert room_of(module) == room
