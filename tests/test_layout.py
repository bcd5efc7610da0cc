"""The shape of src/: a folder per concept, imports pointing one way, folders small enough to read.

Read from the source with `ast` (every import, the lazy ones inside functions too), so a new file
or a new import that breaks the layout fails here rather than in a reader's head.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Lowest first. A folder may import folders of lower tiers only: never its own tier, never upward.
TIERS: list[set[str]] = [
    {"errors"},
    {"arguments", "user_modules"},
    {"config"},
    {"registry", "tracking"},
    {"data", "models", "evaluators", "results", "distributed"},
    {"optim"},
    {"checkpoint"},
    {"techniques"},
    {"engine"},
    {"run", "workflows"},
    {"search"},
]
TIER = {name: i for i, names in enumerate(TIERS) for name in names}
MAX_FILES, MAX_LINES = 12, 1600  # per folder, __init__.py not counted as a file


def unit_of(path: Path) -> str:
    """The folder (or top-level module) a file of src/ belongs to: `src/engine/trainer.py` -> engine."""
    return path.relative_to(SRC).with_suffix("").parts[0]


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def src_imports(path: Path) -> set[str]:
    """Every `src.*` module a file imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "src":
                found.update(f"src.{alias.name}" for alias in node.names)
            elif node.module.startswith("src."):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("src."))
    return found


def source_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p != SRC / "__init__.py")


def existing_modules() -> set[str]:
    return {module_of(p) for p in source_files()}


def test_every_folder_of_src_has_a_place_in_the_tiers() -> None:
    units = {unit_of(p) for p in source_files()}
    assert units <= set(TIER), f"add {sorted(units - set(TIER))} to TIERS in tests/test_layout.py"
    assert set(TIER) <= units, f"TIERS names folders that no longer exist: {sorted(set(TIER) - units)}"


def test_imports_point_down_the_tiers() -> None:
    known = existing_modules()
    wrong = []
    for path in source_files():
        here = unit_of(path)
        for module in src_imports(path):
            if module not in known:  # `from src.x import name` also yields src.x.name: keep modules only
                continue
            there = module.split(".")[1]
            if there != here and TIER[there] >= TIER[here]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module} ({here} -> {there})")
    assert not wrong, "imports against the tiers:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules() -> None:
    known = existing_modules()
    graph = {module_of(p): {m for m in src_imports(p) if m in known} for p in source_files()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in SRC.glob("*/__init__.py")))
def test_each_folder_is_small_and_says_what_it_holds(folder: str) -> None:
    files = [p for p in (SRC / folder).glob("*.py") if p.name != "__init__.py"]
    lines = sum(len(p.read_text().splitlines()) for p in (SRC / folder).glob("*.py"))
    assert len(files) <= MAX_FILES, f"src/{folder}/ holds {len(files)} files: split it by concept"
    assert lines <= MAX_LINES, f"src/{folder}/ holds {lines} lines: split it by concept"
    doc = ast.get_docstring(ast.parse((SRC / folder / "__init__.py").read_text()))
    assert doc and "import" in doc, (
        f"src/{folder}/__init__.py must say what lives there and what it may import"
    )


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The tier test reads lazy imports too: a function-level `from src.run ...` in data/ counts."""
    fake = tmp_path / "src" / "data" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from src.run.main import train_main\n    from src import registry\n")
    assert src_imports(fake) >= {"src.run.main", "src.registry"}


def test_public_imports_work_in_a_fresh_interpreter() -> None:
    """What users' plugins and the docs import, and the entry points' cheap start (no torch for --help)."""
    code = (
        "import sys\n"
        "from src.run import cli\n"
        "import src.run.precheck\n"
        "assert 'torch' not in sys.modules, 'the CLI must answer --help and bad input before torch loads'\n"
        "from src import (DATASET_REGISTRY, EVALUATOR_REGISTRY, LOSS_REGISTRY, LR_SCHEDULER_REGISTRY,\n"
        "                 MODEL_REGISTRY, OPTIMIZER_REGISTRY, TRANSFORM_REGISTRY, Registry)\n"
        "from src.evaluators import BaseEvaluator\n"
        "from src.config import load_config\n"
        "from src.data import ResumableSampler, build_loader\n"
        "from src.run.main import train_main, test_main\n"
        "from src.engine.trainer import Trainer\n"
        "from src.checkpoint.checkpointer import Checkpointer, safe_load\n"
        "from src.search.sweep import grid_points\n"
        "assert 'SimpleCNN' in MODEL_REGISTRY and 'AdamW' in OPTIMIZER_REGISTRY\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
