"""The architecture is checked, not only described: the layer contracts in pyproject.toml fail
on a forbidden import, and no module reads another module's private names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import textspan

PACKAGE = Path(textspan.__file__).parent
ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _private_names_read_across_modules(path: Path) -> list[str]:
    """`from textspan.x import _y` and `x._y` where x names a textspan module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()  # local names bound to textspan modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            inside = node.level > 0 or (node.module or "").startswith("textspan")
            for alias in node.names:
                if inside and alias.name.startswith("_") and alias.name != "_core":
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                elif inside:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("textspan"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.value.id != "_core"
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_reads_another_modules_private_names():
    offences = {
        str(p.relative_to(PACKAGE)): found
        for p in _modules()
        if (found := _private_names_read_across_modules(p))
    }
    assert not offences, offences


def test_the_private_name_check_catches_both_forms(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from .store.format import _hidden\nfrom . import report\nreport._pyplot()\n")
    assert len(_private_names_read_across_modules(sample)) == 2


def _lint_imports(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(package_parent), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_the_layer_contracts_fail_when_a_forbidden_import_is_added(tmp_path):
    # A copy of the package with the contracts, and one import that breaks them: the core
    # (NumPy tier) reaching up into the models tier, and through it PyTorch.
    copy = tmp_path / "src" / "textspan"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "data", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    clean = _lint_imports(tmp_path, tmp_path / "src")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    metrics = copy / "core" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom ..models import Decomposer  # noqa\n")
    broken = _lint_imports(tmp_path, tmp_path / "src")
    assert broken.returncode != 0
    assert "textspan.core.metrics -> textspan.models" in broken.stdout, broken.stdout
    assert "BROKEN" in broken.stdout


def test_the_numpy_only_tests_run_without_pytorch():
    """tests/core and tests/analysis need NumPy and the extension only: they are run here
    with PyTorch and the rest of the model side made unimportable."""
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'open_clip', 'PIL', 'matplotlib', 'ray'):\n"
        "    sys.modules[m] = None\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/core', 'tests/analysis']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_an_extraction_goes_down_the_tiers_and_the_engines_hand_rows_to_the_writer(
    tmp_path,
):
    """Every call between textspan modules during an extraction, traced: the engines reach
    the store tier only through its writer (and its image reading and manifest), and only
    the store tier touches the store's files (store/format.py)."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((48, 48, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    textspan.load("toy")  # loaded before the trace, which then shows the extraction alone
    calls: set[tuple[str, str, str]] = set()

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "")
        if callee.startswith("textspan.") and caller.startswith("textspan.") and callee != caller:
            calls.add((caller, callee, frame.f_code.co_name))

    engine = textspan.LocalEngine(workers=0, device="cpu")
    sys.setprofile(profile)
    try:
        textspan.extract(images, tmp_path / "store", model="toy", engine=engine, progress=False)
    finally:
        sys.setprofile(None)
    engines_to_store = {
        callee
        for caller, callee, _ in calls
        if caller.startswith("textspan.engines") and callee.startswith("textspan.store")
    }
    assert "textspan.store.writer" in engines_to_store
    allowed = {"textspan.store.writer", "textspan.store.images", "textspan.store.manifest"}
    assert engines_to_store <= allowed, engines_to_store
    outside = {c for c, callee, _ in calls if callee == "textspan.store.format"}
    assert all(c.startswith("textspan.store.") for c in outside), outside


def test_no_import_cycles_not_even_under_type_checking():
    """No two textspan modules import each other, directly or around a loop, counting the
    imports made for type checking only (the extension's importers seen as importing the
    package's front are not a loop: they import only the compiled `_core`)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("textspan", exclude_type_checking_imports=False)
    edges = {
        m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("textspan")}
        - ({"textspan"} if m.startswith("textspan.core") else set())
        for m in graph.modules
        if m.startswith("textspan")
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                loops.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not loops, loops
