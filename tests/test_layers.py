"""The layer contract, read from the import graph of every module (function-local imports included).

```
platform   -> everything                      (the only layer that imports mlflow or optuna)
evaluators -> bench (task definitions), families, hf, _*          never mlflow, optuna, platform
bench      -> engine, methods, evaluators, families, hf, _*       never mlflow, optuna, platform
engine     -> methods, families, _*                               never mlflow, optuna, platform, evaluators, bench
methods    -> torch and the standard library only
families   -> the standard library only (pure data, read by the engine, the evaluators and the loader)
```

A violation fails CI with ``file:line module`` for each offending import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mergelab"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
NEVER_OUTSIDE_PLATFORM = {"mlflow", "optuna", "optuna_integration"}

# layer -> (allowed mergelab subpackages / modules, allowed third-party top-level packages or None for "any")
RULES: dict[str, tuple[set[str], set[str] | None]] = {
    "methods": ({"methods"}, {"torch"}),
    "families": ({"families"}, set()),
    "engine": ({"engine", "methods", "families", "_files", "_dtypes", "_device"}, None),
    "evaluators": ({"evaluators", "bench", "families", "hf", "_files", "_dtypes", "_device"}, None),
    "bench": ({"bench", "engine", "methods", "evaluators", "families", "hf", "_files", "_dtypes", "_device"}, None),
}


def imports_of(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in ``path``: plain, from-, function-local and importlib calls.

    Relative imports are resolved against ``package`` (default: the file's package under mergelab/).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg_parts = package.split(".") if package else list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            out.append((node.lineno, str(node.args[0].value)))
    return out


def violations(path: Path, layer: str, package: str | None = None) -> list[str]:
    own, third = RULES[layer]
    bad = []
    where = path.name if package else path.relative_to(PKG.parent)
    for line, mod in imports_of(path, package):
        top = mod.split(".")[0]
        if top == "mergelab":
            sub = mod.split(".")[1] if "." in mod else ""
            if sub and sub not in own:
                bad.append(f"{where}:{line} {mod}")
        elif top in NEVER_OUTSIDE_PLATFORM or (third is not None and top not in STDLIB and top not in third):
            bad.append(f"{where}:{line} {mod}")
    return bad


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_the_contract_allows(layer: str) -> None:
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, f"no modules in mergelab/{layer}"
    bad = [v for f in files for v in violations(f, layer)]
    assert not bad, f"mergelab/{layer} breaks the layer contract:\n" + "\n".join(bad)


def test_only_platform_imports_mlflow_or_optuna() -> None:
    files = [f for f in PKG.rglob("*.py") if "platform" not in f.relative_to(PKG).parts]
    bad = [f"{f}:{line} {m}" for f in files for line, m in imports_of(f) if m.split(".")[0] in NEVER_OUTSIDE_PLATFORM]
    assert not bad, "only mergelab/platform may import mlflow/optuna:\n" + "\n".join(bad)


@pytest.mark.parametrize("src,layer", [
    ("import mlflow\n", "bench"),
    ("def f():\n    import optuna\n", "evaluators"),
    ("importlib.import_module('mlflow.pyfunc')\n", "engine"),
    ("from mergelab.engine import merge\n", "methods"),
    ("import numpy\n", "methods"),
    ("from mergelab.platform.store import Store\n", "engine"),
    ("from mergelab.evaluators import evaluate\n", "engine"),
    ("from ..platform import cli\n", "bench"),
    ("import torch\n", "families"),
])
def test_the_contract_catches_each_kind_of_violation(tmp_path: Path, src: str, layer: str) -> None:
    f = tmp_path / "probe.py"
    f.write_text(src)
    assert violations(f, layer, package=f"mergelab.{layer}"), src


def test_allowed_imports_pass(tmp_path: Path) -> None:
    f = tmp_path / "probe.py"
    f.write_text("import json\nimport torch\nfrom mergelab.methods import METHODS\nfrom . import io\n")
    assert not violations(f, "engine", package="mergelab.engine")
