"""An ``MLmodel`` file (MLflow's transformers flavour) beside merged weights, so a registered version is a real MLflow
model: ``mlflow.transformers.load_model("models:/NAME@champion")`` returns a pipeline, with the weights stored once.

A version's source is the merge run's own ``merged/`` directory (zero-copy registration). This module writes, in that
directory, the flavour's description of it: the model class and task from ``config.json``, ``model_binary: .`` (the
weights are the directory itself, not a copy under ``model/``), and ``components/tokenizer/`` holding hard links
to the tokenizer's files beside the weights. No weights are copied. Written for text causal LMs
(``*ForCausalLM`` with a tokenizer), the models MLflow's transformers pipelines serve; vision-language checkpoints
(MLflow's flavour refuses their processors as pipelines) get no ``MLmodel`` and load with
:func:`mergelab.platform.registry.load_registered` or ``AutoModel*.from_pretrained`` on the version's directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_EXTRA = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def write_mlmodel(model_dir: str | os.PathLike[str]) -> bool:
    """Write ``MLmodel`` (transformers flavour, text generation) into ``model_dir`` when it holds a causal LM and
    its tokenizer; return whether it did. Never copies weights; an existing ``MLmodel`` is kept."""
    import mlflow
    import transformers

    d = Path(model_dir)
    if (d / "MLmodel").exists():
        return True
    try:
        cfg = yaml.safe_load((d / "config.json").read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return False
    arch = (cfg.get("architectures") or [""])[0]
    tokenizer = _tokenizer_class(d)
    if not arch.endswith("ForCausalLM") or not hasattr(transformers, arch) or tokenizer is None:
        log.debug("%s: no MLmodel (architecture %r, tokenizer %r)", d, arch, tokenizer)
        return False
    _link_tokenizer(d, d / "components" / "tokenizer")
    flavor = {"task": "text-generation", "instance_type": "TextGenerationPipeline", "pipeline_model_type": arch,
              "source_model_name": str(d), "framework": "pt", "model_binary": ".", "components": ["tokenizer"],
              "tokenizer_type": tokenizer, "tokenizer_name": str(d),
              "transformers_version": transformers.__version__}
    # No uuid or creation time: the file is a function of the directory, so its content hash stays reproducible.
    mlmodel = {"artifact_path": d.name, "flavors": {"transformers": flavor}, "mlflow_version": mlflow.__version__,
               "metadata": {"mergelab": "zero-copy: model_binary is this directory"}}
    tmp = d / f".MLmodel.{uuid.uuid4().hex}"
    tmp.write_text(yaml.safe_dump(mlmodel, sort_keys=False))
    tmp.replace(d / "MLmodel")
    return True


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
        name = yaml.safe_load((d / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except yaml.YAMLError:
        return None
    return name or "PreTrainedTokenizerFast"
