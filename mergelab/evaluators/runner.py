"""The generation runner: batched greedy decoding of Hugging Face VLMs and text LMs, then scoring per task.

Prompts are built exactly as for the real model: one user turn holding the image then the question, rendered by
``processor.apply_chat_template(messages, add_generation_prompt=True)`` (Qwen2-VL model card). A family-specific
template is used only when neither the processor nor its tokenizer carries a chat template. Decoding is greedy
(``do_sample=False``, one beam) with left padding, on the model's own device and dtype, under
``torch.inference_mode``, so a run is deterministic for a given model, data and batch size. Generation stops at
the tokenizer's EOS, the model's ``generation_config.eos_token_id`` and the chat end-of-turn tokens
(``<|im_end|>``, ``<end_of_utterance>``) that the vocabulary holds; special tokens are skipped on decoding (box
answers are still parsed: :func:`mergelab.evaluators.metrics.parse_box` accepts ``(x1,y1),(x2,y2)`` alone).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab import _signals
from mergelab.evaluators.loaders import Sample, open_image
from mergelab.evaluators.suites import SUITES
from mergelab.evaluators.tasks import OFFLINE_TASKS, Task, get_task, metric_name
from mergelab.families import end_of_turn_tokens, family_for_model_type

END_OF_TURN_TOKENS = end_of_turn_tokens()
"""Every family's end-of-turn tokens (:mod:`mergelab.families`); generation stops at those the vocabulary holds."""


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", None) or processor


def _has_image_processor(processor: Any) -> bool:
    return getattr(processor, "image_processor", None) is not None


def _chat_template(processor: Any) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)


def build_prompt(processor: Any, question: str, *, with_image: bool, model_type: str = "") -> str:
    """Render one user turn (image first, then the question) with the processor's chat template.

    Args:
        processor: A multimodal processor, or a tokenizer for text LMs.
        question: The user's text.
        with_image: Whether the turn carries one image.
        model_type: ``model.config.model_type``, whose family's :class:`~mergelab.families.ChatFacts` give the
            fallback template when there is no chat template (Qwen2-VL, Qwen2.5-VL, LLaVA, SmolVLM / Idefics3;
            else plain text).

    Returns:
        The prompt string, ending with the assistant turn's opening.
    """
    if _chat_template(processor):
        if with_image:
            content: Any = [{"type": "image"}, {"type": "text", "text": question}]
        elif _has_image_processor(processor):
            content = [{"type": "text", "text": question}]
        else:
            content = question
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    family = family_for_model_type(model_type)
    chat = family.chat if family is not None else None
    image = ""
    if with_image:
        image = (chat and chat.image_placeholder) or getattr(processor, "image_token", None) or "<image>"
    if chat is not None and chat.template is not None:
        return chat.template.format(image=image, text=question)
    return f"{image}{question}\n"


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for v in [eos] if isinstance(eos, int) else list(eos or []):
        ids.append(int(v))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.extend(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(set(ids))


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def generate(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any] | None = None,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy-decode a continuation of every prompt, in batches, and return the decoded texts in order.

    Args:
        model: A ``transformers`` generative model (VLM or causal LM), already on its device.
        processor: Its processor (multimodal) or tokenizer (text).
        prompts: Full prompt strings (:func:`build_prompt`).
        images: One PIL image (or None) per prompt, or None for text-only prompts.
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Generation budget per prompt.
        progress: Show a tqdm progress bar.
        desc: The progress bar's label.

    Returns:
        The generated texts, special tokens skipped, cut at the first stop token, stripped of nothing else.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = _tokenizer(processor)
    device, dtype = _model_device_dtype(model)
    stop = _stop_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1, eos_token_id=stop or None,
        pad_token_id=pad_id,
    )  # fmt: skip
    family = family_for_model_type(str(getattr(getattr(model, "config", None), "model_type", "") or ""))
    nested = family is not None and family.processor.nested_images
    out_texts: list[str] = []
    old_side, old_pad, was_training = tok.padding_side, tok.pad_token, model.training
    tok.padding_side = "left"
    if tok.pad_token is None:  # e.g. Llama tokenizers: pad with EOS for the duration of the call
        tok.pad_token = tok.eos_token
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    try:
        for i in range(0, len(prompts), batch_size):
            _signals.check()  # a safe point: between generation batches (a stop request is acted on here)
            chunk = list(prompts[i : i + batch_size])
            imgs = list(images[i : i + batch_size]) if images is not None else None
            if imgs is not None and any(im is not None for im in imgs):
                if any(im is None for im in imgs):
                    raise ValueError("generate: a batch mixes prompts with and without images")
                imgs = [[im] for im in imgs] if nested else imgs
                enc = processor(text=chunk, images=imgs, return_tensors="pt", padding=True)
            elif _has_image_processor(processor):
                enc = processor(text=chunk, return_tensors="pt", padding=True)
            else:
                # a chat template usually writes BOS itself: do not add a second one
                bos = tok.bos_token
                add = not (bos and all(p.startswith(bos) for p in chunk))
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=add)
            inputs = {
                k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device))
                for k, v in enc.items()
                if isinstance(v, torch.Tensor)
            }
            with torch.inference_mode():
                out = model.generate(**inputs, generation_config=gen_cfg)
            new = out[:, inputs["input_ids"].shape[1] :].tolist()
            for row in new:
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                out_texts.append(tok.decode(row[:cut], skip_special_tokens=True))
            bar.update(len(chunk))
    finally:
        bar.close()
        tok.padding_side = old_side
        if old_pad is None:
            tok.pad_token = None
        model.train(was_training)
    return out_texts


def _mean_finite(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class EvalResult:
    """An evaluation's results: what :func:`evaluate` returns and what the platform logs (the one result type).

    Attributes:
        scores: Primary metric per task, in percent (0-100).
        average: Unweighted mean of ``scores`` over tasks with a finite score (kept up to date by
            ``__post_init__`` and :meth:`update`).
        metrics: Flat ``{"<task>/<metric>": percent, ..., "avg/score": average}``; MLflow-safe names.
        records: Per-sample dicts: task, id, prompt, prediction, references, score (primary, in [0, 1]), values.
        config: The evaluation settings (tasks, split, data roots, limit, batch size, budget, seconds).
        split: The split evaluated (``"val"``, ``"test"``...); the prefix of :meth:`flat_metrics`.
    """

    scores: dict[str, float] = field(default_factory=dict)
    average: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    split: str = ""

    def __post_init__(self) -> None:
        if self.scores and not math.isfinite(self.average):
            self.average = _mean_finite(self.scores.values())

    @property
    def worst_task(self) -> float:
        """The minimum per-task score (NaN when empty)."""
        return min(self.scores.values()) if self.scores else math.nan

    def normalized_average(self, reference: Mapping[str, float] | None) -> float | None:
        """Mean over tasks of ``100 * score / reference[task]`` for tasks with a positive reference score (the
        paper's normalised average: merge score over the expert's own score); None without references."""
        if not reference:
            return None
        ratios = [100.0 * s / reference[t] for t, s in self.scores.items() if reference.get(t, 0) > 0]
        return sum(ratios) / len(ratios) if ratios else None

    def flat_metrics(self, reference: Mapping[str, float] | None = None) -> dict[str, float]:
        """``<split>/...`` metric names: every per-task metric, each task's primary score, ``average``,
        ``worst_task`` and (with references) ``normalized_average``."""
        sp = self.split or "eval"
        out = {f"{sp}/{k}": float(v) for k, v in self.metrics.items()
               if not k.startswith("avg/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.update({f"{sp}/{t}": float(s) for t, s in self.scores.items()})
        out[f"{sp}/average"] = self.average
        out[f"{sp}/worst_task"] = self.worst_task
        norm = self.normalized_average(reference)
        if norm is not None:
            out[f"{sp}/normalized_average"] = norm
        return out

    def only(self, task: str) -> EvalResult:
        """The part of this result that belongs to one task (its score, metrics and records)."""
        return EvalResult(scores={task: self.scores[task]} if task in self.scores else {},
                          metrics={k: v for k, v in self.metrics.items() if k.split("/", 1)[0] == task},
                          records=[r for r in self.records if r.get("task") == task], split=self.split)

    def update(self, other: EvalResult) -> None:
        """Add another evaluation's tasks (scores, metrics, records) and recompute the average."""
        self.scores.update(other.scores)
        self.metrics.update({k: v for k, v in other.metrics.items() if not k.startswith("avg/")})
        self.records.extend(other.records)
        self.average = _mean_finite(self.scores.values())
        if "avg/score" in self.metrics or other.metrics.get("avg/score") is not None:
            self.metrics["avg/score"] = self.average

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (NaN stays NaN; ``json.dumps`` writes it as ``NaN``)."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (a temporary file in the same directory, renamed).

        Args:
            path: The destination file; its directory is created if needed.

        Returns:
            The written path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def summary(self) -> str:
        """One line per task plus the average, for terminals and logs."""
        lines = [f"{t:<16} {v:6.2f}" for t, v in self.scores.items()]
        lines.append(f"{'avg':<16} {self.average:6.2f}")
        return "\n".join(lines)


def run_task(
    model: Any,
    processor: Any,
    task: Task,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate, parse and score one task's samples.

    Returns:
        ``(aggregated metrics in percent, per-sample records)``.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    with_images = any(s.image is not None for s in samples)
    if with_images and not _has_image_processor(processor):
        raise ValueError(
            f"task {task.name!r} has images but {type(processor).__name__} has no image processor"
        )
    if task.generate is not None:  # the task builds its own inputs (the omni tasks: image, audio and video)
        prompts = [task.prompt(s) for s in samples]
    else:
        prompts = [build_prompt(processor, task.prompt(s), with_image=s.image is not None, model_type=model_type)
                   for s in samples]  # fmt: skip
    texts: list[str] = []
    budget = int(max_new_tokens or task.max_new_tokens)
    # Open images one batch at a time so that a large benchmark never sits in memory.
    step = max(1, batch_size)
    bar = tqdm(total=len(samples), desc=f"eval {task.name}", disable=not progress)
    try:
        for i in range(0, len(samples), step):
            part = samples[i : i + step]
            imgs = (
                [open_image(s.image) if s.image is not None else None for s in part] if with_images else None
            )
            if task.generate is not None:
                texts += task.generate(model, processor, part, batch_size, budget)
            else:
                texts += generate(model, processor, prompts[i : i + step], imgs, batch_size=batch_size,
                                  max_new_tokens=budget)  # fmt: skip
            bar.update(len(part))
    finally:
        bar.close()
    values, records = [], []
    for s, prompt, raw in zip(samples, prompts, texts, strict=True):
        pred = task.parse(raw)
        v = task.score(pred, s)
        values.append(v)
        records.append({"task": task.name, "id": s.id, "prompt": prompt, "prediction": pred, "raw": raw,
                        "references": list(s.answers), "score": float(v[task.primary]), "values": v})  # fmt: skip
    return task.aggregate(values, list(samples)), records


def evaluate(
    model: Any,
    processor: Any,
    tasks: Sequence[str] = OFFLINE_TASKS,
    split: str = "val",
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate an in-memory model on a list of registered tasks.

    Args:
        model: A ``transformers`` VLM or causal LM (on any device).
        processor: Its processor (VLM) or tokenizer (text LM).
        tasks: Task names from :data:`mergelab.evaluators.tasks.TASKS` (default: the offline benchmark's five),
            or one task or suite name as a string (``"paper"``, ``"offline"``, ``"offline_generic"``).
        split: The offline benchmark's split (``train``/``val``/``test``); paper tasks use their fixed split.
        data_root: Root of the data; None uses each task's default root (offline: ``$MERGELAB_DATA``,
            paper: ``$MERGELAB_PAPER_DATA``).
        limit: Evaluate the first ``limit`` samples of each task.
        batch_size: Prompts per generation batch.
        max_new_tokens: Generation budget for every task; None uses each task's default.
        progress: Show progress bars.

    Returns:
        The :class:`EvalResult`.

    Raises:
        KeyError: an unknown task name.
        FileNotFoundError: a data file is missing (named in the message).
        ValueError: a task has no samples, or the data is malformed.
    """
    if isinstance(tasks, str):  # one task, or a suite name ("paper", "offline", "offline_generic")
        tasks = list(SUITES[tasks].tasks) if tasks in SUITES else [tasks]
    specs = [get_task(t) for t in tasks]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {list(tasks)}")
    t0 = time.perf_counter()
    result = EvalResult()
    roots: dict[str, str] = {}
    for task in specs:
        root = Path(data_root).expanduser() if data_root is not None else task.default_root()
        roots[task.name] = str(root)
        samples = task.load(root, split, limit)
        if not samples:
            raise ValueError(f"task {task.name!r}: no samples under {root} (split {split!r}, limit {limit})")
        agg, records = run_task(model, processor, task, samples, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, progress=progress)  # fmt: skip
        result.scores[task.name] = float(agg[task.primary])
        result.metrics.update({metric_name(task.name, k): float(v) for k, v in agg.items()})
        result.records.extend(records)
    result.average = _mean_finite(result.scores.values())
    result.metrics["avg/score"] = result.average
    result.split = split
    result.config = {"tasks": list(tasks), "split": split, "data_roots": roots, "limit": limit,
                     "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                     "num_samples": {t.name: sum(r["task"] == t.name for r in result.records) for t in specs},
                     "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return result


def evaluate_path(
    model_dir: str | Path,
    tasks: Sequence[str] = OFFLINE_TASKS,
    split: str = "val",
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
    *,
    device: str = "auto",
    dtype: str | None = None,
) -> EvalResult:
    """Load a checkpoint directory with :func:`mergelab.hf.load_model` and :func:`evaluate` it.

    Args:
        model_dir: A checkpoint (or LoRA adapter) directory.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"`` ...
        dtype: None keeps the checkpoint's dtype; else e.g. ``"bfloat16"``.
        Others: as :func:`evaluate`.
    """
    from mergelab.hf import load_model

    model, processor = load_model(model_dir, device=device, dtype=dtype)
    res = evaluate(model, processor, tasks=tasks, split=split, data_root=data_root, limit=limit,
                   batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)  # fmt: skip
    res.config["model_dir"] = str(model_dir)
    return res
