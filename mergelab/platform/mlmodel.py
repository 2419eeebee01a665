"""An ``MLmodel`` file beside merged weights, so a registered version is a real MLflow model, with the weights
stored once.

A version's source is the merge run's own ``merged/`` directory (zero-copy registration). This module writes, in that
directory, MLflow's description of it; no weights are copied:

* a text causal LM (``*ForCausalLM`` with a fast tokenizer) gets the transformers flavour (task
  ``text-generation``, model class from ``config.json``, ``model_binary: .``: the weights are the directory itself,
  not a copy under ``model/``; ``components/tokenizer/`` holds hard links to the tokenizer's files), so
  ``mlflow.transformers.load_model("models:/NAME@champion")`` returns a pipeline;
* a vision-language model (``config.json`` with a ``vision_config`` and an image processor beside it) gets a
  ``python_function`` flavour whose loader is :mod:`mergelab.platform.pyfunc_vlm` (``data: .``), so
  ``mlflow.pyfunc.load_model("models:/NAME@champion").predict({"image": ..., "question": ...})`` answers. MLflow's
  transformers flavour cannot: it refuses a ``processor`` component for pipelines and pyfunc alike.

Both files are deterministic (no uuid or creation time), so the directory's content hash stays reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

VLM_LOADER = "mergelab.platform.pyfunc_vlm"
"""The ``loader_module`` of a VLM's ``python_function`` flavour (named, not imported: registering stays light)."""
VLM_OPTIONS: dict[str, Any] = {"max_new_tokens": 32, "batch_size": 8, "device": "cpu", "dtype": None}
"""A VLM version's options and defaults: its flavour's ``config`` (MLflow lets ``load_model(model_config=...)``
override only the keys written there)."""
VLM_PARAMS = ("max_new_tokens", "batch_size")
"""The per-call ``params`` of a VLM version's ``predict``."""
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_EXTRA = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def write_mlmodel(model_dir: str | os.PathLike[str]) -> bool:
    """Write ``MLmodel`` into ``model_dir`` when MLflow can load what it holds (a causal LM and its tokenizer, or a
    VLM and its processor); return whether it did. Never copies weights; an existing ``MLmodel`` is kept."""
    import transformers

    d = Path(model_dir)
    if (d / "MLmodel").exists():
        return True
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if not isinstance(cfg, dict):
        return False
    arch = (cfg.get("architectures") or [""])[0]
    if not arch or not hasattr(transformers, arch):
        log.debug("%s: no MLmodel (architecture %r)", d, arch)
        return False
    extra: dict[str, Any] = {}
    if cfg.get("vision_config") is not None and (d / IMAGE_PROCESSOR_FILE).is_file():
        flavors: dict[str, Any] = {"python_function": _vlm_flavor(arch)}
        extra = {"signature": _vlm_signature()}
    elif arch.endswith("ForCausalLM") and (tokenizer := _tokenizer_class(d)) is not None:
        _link_tokenizer(d, d / "components" / "tokenizer")
        flavors = {"transformers": _text_flavor(d, arch, tokenizer)}
    else:
        log.debug("%s: no MLmodel (architecture %r without a tokenizer or an image processor)", d, arch)
        return False
    _write_atomic(d, flavors, extra)
    return True


def _text_flavor(d: Path, arch: str, tokenizer: str) -> dict[str, Any]:
    """The transformers flavour of a text-generation pipeline whose weights are ``d`` itself."""
    import transformers

    return {"task": "text-generation", "instance_type": "TextGenerationPipeline", "pipeline_model_type": arch,
            "source_model_name": str(d), "framework": "pt", "model_binary": ".", "components": ["tokenizer"],
            "tokenizer_type": tokenizer, "tokenizer_name": str(d), "transformers_version": transformers.__version__}


def _vlm_flavor(arch: str) -> dict[str, Any]:
    """The ``python_function`` flavour of a VLM: :mod:`mergelab.platform.pyfunc_vlm` loads the directory itself."""
    import transformers
    from mlflow.utils.environment import PYTHON_VERSION

    return {"loader_module": VLM_LOADER, "data": ".", "python_version": PYTHON_VERSION,
            "config": dict(VLM_OPTIONS), "task": "image-text-to-text", "architecture": arch,
            "transformers_version": transformers.__version__}


def _vlm_signature() -> dict[str, Any]:
    """A signature with no input schema (rows stay as given: PIL images, paths, bytes) and the per-call params
    ``max_new_tokens`` and ``batch_size``: MLflow drops every ``params`` key a signature does not declare. Their
    defaults are null, so the loader's (or ``model_config``'s) values hold unless a call sets them."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema([ParamSpec(k, "long", None) for k in VLM_PARAMS])
    return {"inputs": None, "outputs": None, "params": params.to_json()}


def _write_atomic(d: Path, flavors: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    import mlflow

    mlmodel = {"artifact_path": d.name, "flavors": flavors, "mlflow_version": mlflow.__version__, **(extra or {}),
               "metadata": {"mergelab": "zero-copy: the model's files are this directory"}}
    tmp = d / f".MLmodel.{uuid.uuid4().hex}"
    try:
        tmp.write_text(yaml.safe_dump(mlmodel, sort_keys=False))
        tmp.replace(d / "MLmodel")
    except BaseException:
        tmp.unlink(missing_ok=True)  # no debris in the version's directory (its content hash covers every file)
        raise


def _link_tokenizer(d: Path, dest: Path) -> None:
    """The tokenizer's files in ``dest``, hard-linked (a copy where the filesystem cannot link; they are small).
    Not a symlink to ``d``: a link back to its own parent loops tools that walk or copy the directory."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        if f.is_file() and (f.name in TOKENIZER_EXTRA or f.name.startswith("tokenizer")):
            target = dest / f.name
            if target.exists():
                continue
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def _tokenizer_class(d: Path) -> str | None:
    """The tokenizer class named in ``tokenizer_config.json`` (None without a fast tokenizer's files)."""
    if not all((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tok = json.loads((d / "tokenizer_config.json").read_text())
    except json.JSONDecodeError:
        return None
    return (tok.get("tokenizer_class") if isinstance(tok, dict) else None) or "PreTrainedTokenizerFast"
