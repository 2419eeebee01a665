"""Register the omni classes with transformers' Auto classes the first time an Auto class is looked up.

``import mergelab`` calls :func:`install`, which imports nothing heavy: the omni classes (and with them torch and
Qwen2.5-Omni's modeling code, about 3 s) are imported only when a program asks ``transformers`` for one of
:data:`AUTO_NAMES` (``transformers.AutoModelForImageTextToText``, ``from transformers import AutoProcessor`` ...),
which is exactly when a saved omni checkpoint could be loaded.

How: transformers' top-level module is a lazy module that imports each public name on its first attribute access.
:func:`install` gives that module object a subclass whose ``__getattr__`` registers the omni classes after
resolving an Auto name. If transformers is not imported yet, a one-shot import hook does this once its top-level
package has run. Registration imports :mod:`mergelab.bench.omni.classes`, which imports no other mergelab module, so
it cannot re-enter a half-imported mergelab module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

CLASSES_MODULE = "mergelab.bench.omni.classes"
"""The module whose import registers the omni config, model and processor."""

AUTO_NAMES = frozenset({"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM",
                        "AutoProcessor", "AutoModelForVision2Seq", "AutoModelForMultimodalLM"})
"""transformers attributes whose first lookup triggers the registration."""

_state = {"done": False, "running": False}


def register_now() -> None:
    """Import the omni classes (registering them); re-entrant calls during that import are no-ops."""
    if _state["done"] or _state["running"]:
        return
    _state["running"] = True
    try:
        importlib.import_module(CLASSES_MODULE)
        _state["done"] = True
    finally:
        _state["running"] = False


def _patch(module: types.ModuleType) -> None:
    """Give the loaded transformers module object a ``__getattr__`` that registers on the first Auto lookup."""
    base = type(module)
    if getattr(base, "_mergelab_omni", False):
        return

    def __getattr__(self: Any, name: str) -> Any:
        value = base.__getattr__(self, name)
        if name in AUTO_NAMES:
            register_now()
        return value

    module.__class__ = type(base.__name__, (base,), {"__getattr__": __getattr__, "_mergelab_omni": True,
                                                     "__module__": base.__module__})
    if any(hasattr(module.__dict__.get(n), "register") for n in AUTO_NAMES):  # an Auto name already resolved
        register_now()


class _Loader(importlib.abc.Loader):
    """Wraps transformers' own loader; patches the module once its package has run."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        _patch(sys.modules.get(module.__name__, module))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """One-shot finder for the top-level ``transformers`` package."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Arrange for the omni classes to be registered when transformers' Auto classes are first used."""
    module = sys.modules.get("transformers")
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
