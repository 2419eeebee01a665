"""lm-eval adapter: run any lm-eval task list on an in-memory model, and the offline benchmark as lm-eval tasks.

* Text LMs run through ``lm_eval.models.huggingface.HFLM``; VLMs through ``HFMultimodalLM`` (``hf-multimodal``,
  generate-only for image requests; the model type and image string per family come from
  :mod:`mergelab.families`), subclassed to keep an in-memory processor (lm-eval 0.4.13 *returns* a processor
  passed as ``tokenizer=`` instead of storing it).
* The offline benchmark's lm-eval tasks (``mergelab_vqa`` ... ``mergelab_grounding``, their ``*_generic`` twins,
  and the groups ``mergelab_offline`` / ``mergelab_offline_generic``) are written from the evaluators' task table
  (itself derived from :data:`mergelab.bench.tasks.TASK_SPECS`) by :func:`write_lmeval_tasks`, on top of the shared
  config and hooks in ``mergelab/evaluators/lmeval_tasks/``. They read ``<data_root>/<task>/<variant>/<split>.jsonl``
  and score with the native runner's own metric functions, so both paths agree to within generation noise.

``import lm_eval`` takes seconds, so this module imports it only inside :func:`run_lmeval`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergelab.bench.data import default_data_root
from mergelab.evaluators.runner import _stop_ids, _tokenizer
from mergelab.evaluators.tasks import OFFLINE_TASKS, OFFLINE_VARIANTS, get_task
from mergelab.families import family_for_model_type

LMEVAL_TASKS_DIR = Path(__file__).with_name("lmeval_tasks")
"""The offline tasks' shared lm-eval config (``_mergelab_offline.yaml``) and hooks (``utils.py``)."""

OFFLINE_LMEVAL_TASKS = {t: f"mergelab_{t}" for t in OFFLINE_TASKS}
"""Native offline task name -> lm-eval task name (``*_generic`` map to ``mergelab_*_generic``)."""

_UNTIL = ["<|im_end|>"]


def lmeval_task_configs() -> dict[str, dict[str, Any]]:
    """The lm-eval YAML of every offline task and group, by name, derived from the evaluators' task table.

    A task ``mergelab_<task>[_generic]`` includes the shared ``_mergelab_offline.yaml`` and names its data
    (``task``, ``variant``), its generation budget and its metrics (those of the native task); a group
    ``mergelab_offline[_generic]`` lists the variant's tasks in the task table's order.
    """
    base = str(LMEVAL_TASKS_DIR / "_mergelab_offline.yaml")
    configs: dict[str, dict[str, Any]] = {}
    for variant, suffix in OFFLINE_VARIANTS.items():
        members = []
        for bench_task in OFFLINE_TASKS:
            native = get_task(bench_task + suffix)
            name = lmeval_task_name(native.name)
            members.append(name)
            configs[name] = {
                "include": base,
                "task": name,
                "dataset_kwargs": {"task": bench_task, "variant": variant},
                "generation_kwargs": {"until": list(_UNTIL), "max_gen_toks": native.max_new_tokens,
                                      "do_sample": False},  # fmt: skip
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in native.metric_names],  # fmt: skip
            }
        configs[f"mergelab_offline{suffix}"] = {"group": f"mergelab_offline{suffix}", "task": members,
                                                "metadata": {"version": 1.0}}  # fmt: skip
    return configs


def write_lmeval_tasks(directory: str | Path) -> Path:
    """Write :func:`lmeval_task_configs` as ``<name>.yaml`` files into ``directory`` (created) and return it; pass it
    to ``TaskManager(include_path=...)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, cfg in lmeval_task_configs().items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return directory


def lmeval_task_name(native: str) -> str:
    """The lm-eval name of a native offline task (``vqa`` -> ``mergelab_vqa``, ``vqa_generic`` -> ...)."""
    base = native.removesuffix("_generic")
    if base not in OFFLINE_LMEVAL_TASKS:
        raise KeyError(f"{native!r} is not an offline benchmark task; known: {sorted(OFFLINE_LMEVAL_TASKS)}")
    return f"mergelab_{native}"


def sanitize_metric(name: str) -> str:
    """An MLflow-safe metric name: lm-eval's ``"acc,none"`` -> ``"acc"``, ``"f1,strict"`` -> ``"f1_strict"``."""
    name = name.replace(",none", "")
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def _multimodal_lm_class() -> type:
    import transformers
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class InMemoryHFMultimodalLM(HFMultimodalLM):
        """``HFMultimodalLM`` that keeps a processor object passed as ``tokenizer=`` (lm-eval 0.4.13 returns it)."""

        def _create_tokenizer(self, pretrained: Any, tokenizer: Any, **kw: Any) -> None:
            if isinstance(tokenizer, transformers.ProcessorMixin):
                self.processor, self.tokenizer = tokenizer, tokenizer.tokenizer
            else:
                super()._create_tokenizer(pretrained, tokenizer, **kw)

    return InMemoryHFMultimodalLM


def lmeval_model_type(model: Any, processor: Any) -> str:
    """The lm-eval model type that runs ``model`` with ``processor``: ``hf-multimodal`` or ``hf``.

    A processor without an image processor (a tokenizer) always means ``hf``; otherwise the model's family
    (:mod:`mergelab.families`) says, and an unknown family with an image processor is ``hf-multimodal``.
    """
    if getattr(processor, "image_processor", None) is None:
        return "hf"
    family = family_for_model_type(str(getattr(model.config, "model_type", "")))
    return family.lmeval_model if family is not None else "hf-multimodal"


def make_lm(model: Any, processor: Any, *, batch_size: int = 8, max_length: int | None = None) -> Any:
    """Wrap an in-memory model for lm-eval: the multimodal class for VLMs, ``HFLM`` for text LMs.

    The class is chosen by :func:`lmeval_model_type`; a multimodal family's image string (Qwen2-VL's vision
    tokens) comes from its :class:`~mergelab.families.Family` description.

    Args:
        model: A ``transformers`` model already on its device.
        processor: Its processor (VLM: has an ``image_processor``) or tokenizer (text LM).
        batch_size: lm-eval's batch size.
        max_length: Context length; None lets lm-eval read it from the model config.
    """
    device = str(next(model.parameters()).device)
    kw: dict[str, Any] = {"device": device, "batch_size": batch_size}
    if max_length is not None:
        kw["max_length"] = max_length
    if lmeval_model_type(model, processor) == "hf-multimodal":
        family = family_for_model_type(str(getattr(model.config, "model_type", "")))
        if family is not None and family.lmeval_image_string is not None:
            kw["image_string"] = family.lmeval_image_string
        return _multimodal_lm_class()(pretrained=model, tokenizer=processor, **kw)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=processor, **kw)


def _stop_token_ids(model: Any, processor: Any) -> list[int]:
    return _stop_ids(model, _tokenizer(processor))


def run_lmeval(
    model: Any,
    processor: Any,
    tasks: Sequence[str | dict[str, Any]],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    data_root: str | Path | None = None,
    split: str = "val",
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    apply_chat_template: bool | None = None,
    max_length: int | None = None,
    log_samples: bool = False,
    include_defaults: bool | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory model; return MLflow-safe flat metrics and, optionally, the samples.

    The offline benchmark's tasks (``mergelab_*``) are always available; ``data_root``, ``split`` and ``limit``
    select their JSONL (``limit`` is applied when loading, so the first items match the native runner's).
    The model's ``generation_config.eos_token_id`` is widened, for the duration of the call, to the same stop
    tokens the native runner uses, then restored.

    Args:
        model: A ``transformers`` VLM or causal LM.
        processor: Its processor or tokenizer.
        tasks: lm-eval task or group names, or inline task config dicts.
        include_path: Extra directories of YAML tasks.
        data_root: The offline benchmark's root (default: :func:`mergelab.bench.data.default_data_root`).
        split: The offline benchmark's split.
        limit: The offline tasks' item limit (other tasks: lm-eval's ``limit``).
        batch_size: lm-eval batch size.
        num_fewshot: Few-shot examples (None: each task's default).
        apply_chat_template: Render prompts with the chat template; None: when the processor has one.
        max_length: Context length for lm-eval.
        log_samples: Also return lm-eval's per-sample logs under ``"samples"``.
        include_defaults: Index lm-eval's built-in tasks; None: only when a task is named that is neither a
            ``mergelab_*`` task nor an inline config dict (the index takes tens of seconds to build).

    Returns:
        ``{"metrics": {"<task>/<metric>": value}, "results": <lm-eval results>, "samples": ...}``; values are as
        lm-eval reports them (fractions for accuracy-like metrics), stderr entries dropped when not a number.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if apply_chat_template is None:
        tmpl = getattr(processor, "chat_template", None) or getattr(
            getattr(processor, "tokenizer", processor), "chat_template", None
        )
        apply_chat_template = bool(tmpl)
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    metadata = {"data_root": str(root), "split": split, "limit": limit}
    all_offline = all(isinstance(t, str) and t.startswith("mergelab_") for t in tasks)
    if include_defaults is None:
        include_defaults = any(isinstance(t, str) and not t.startswith("mergelab_") for t in tasks)
    lm = make_lm(model, processor, batch_size=batch_size, max_length=max_length)
    gen = getattr(model, "generation_config", None)
    old_eos = getattr(gen, "eos_token_id", None)
    with tempfile.TemporaryDirectory(prefix="mergelab-lmeval-") as generated:
        paths = [str(write_lmeval_tasks(generated))]
        if include_path is not None:
            extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
            paths += [str(p) for p in extra]
        tm = TaskManager(include_path=paths, include_defaults=include_defaults, metadata=metadata)
        if gen is not None:
            gen.eos_token_id = _stop_token_ids(model, processor) or old_eos
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=tm,
                num_fewshot=num_fewshot,
                limit=None if all_offline else limit,
                bootstrap_iters=0,
                log_samples=log_samples,
                apply_chat_template=apply_chat_template,
                torch_random_seed=None,
            )
        finally:
            if gen is not None:
                gen.eos_token_id = old_eos
    metrics: dict[str, float] = {}
    for task, res in (out or {}).get("results", {}).items():
        for k, v in res.items():
            if k == "alias" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if "stderr" in k and not math.isfinite(float(v)):
                continue
            metrics[f"{sanitize_metric(task)}/{sanitize_metric(k)}"] = float(v)
    return {
        "metrics": metrics,
        "results": (out or {}).get("results", {}),
        "samples": (out or {}).get("samples"),
    }
