"""The import rule (STYLE.md section 3 point 8): only ``mergelab/platform/`` imports mlflow or optuna."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mergelab"
FORBIDDEN = {"mlflow", "optuna", "optuna_integration"}


def forbidden_imports(path: Path) -> list[str]:
    """``file:line module`` for every mlflow/optuna import in ``path`` (plain, from-, and relative-free)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        hits += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    return hits


def checked_files() -> list[Path]:
    files = [PKG / "hf.py"]
    for sub in ("methods", "evaluators", "bench"):
        files += sorted((PKG / sub).rglob("*.py"))
    return [f for f in files if f.exists()]


def test_core_packages_never_import_mlflow_or_optuna() -> None:
    files = checked_files()
    assert len(files) > 10 and any(f.parent.name == "methods" for f in files)
    hits = [h for f in files for h in forbidden_imports(f)]
    assert not hits, "only mergelab/platform may import mlflow/optuna:\n" + "\n".join(hits)


@pytest.mark.parametrize("src", ["import mlflow\n", "from optuna.trial import Trial\n", "import os, mlflow.pyfunc\n",
                                 "def f():\n    import optuna\n", "importlib.import_module('mlflow')\n"])
def test_the_rule_catches_every_import_form(tmp_path: Path, src: str) -> None:
    f = tmp_path / "m.py"
    f.write_text(src)
    assert forbidden_imports(f)
    f.write_text("import mlflowish\nfrom . import optuna\n")
    assert not forbidden_imports(f)
