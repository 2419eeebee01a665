"""Scores of the omni benchmark: the cross-modal sets' metrics (as the paper's evaluation scripts compute them).

* AVQA style: correct when the first character of the stripped prediction is exactly the answer letter
  (ModelCompose ``eval_avqa.py``).
* MUSIC-AVQA style: exact match after EvalAI answer normalisation of both sides (``eval_music_avqa.py``; the
  normalisation is :func:`mergelab.evaluators.metrics.vqa_normalize`: lower case, punctuation and articles dropped,
  number words as digits).
* Single-modality tasks: the MUSIC-AVQA rule (the answer is one word).

:func:`score` returns accuracy in percent over all items and per question type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergelab.evaluators.metrics import vqa_normalize


def avqa_correct(prediction: str, answer: str) -> float:
    """1.0 when the prediction's first non-blank character equals the choice letter ``answer``, else 0.0."""
    text = str(prediction).strip()
    return float(bool(text) and text[0] == answer)


def music_avqa_correct(prediction: str, answer: str) -> float:
    """1.0 when prediction and answer are equal after EvalAI normalisation, else 0.0."""
    return float(vqa_normalize(text=prediction) == vqa_normalize(text=answer))


def item_score(task: str, prediction: str, answer: str) -> float:
    """The score of one item of ``task`` (``avqa`` by letter, every other task by normalised exact match)."""
    return avqa_correct(prediction, answer) if task == "avqa" else music_avqa_correct(prediction, answer)


def score(samples: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy (percent) of ``predictions`` on ``samples`` (objects with ``task``, ``qtype``, ``answer``).

    Returns:
        ``{"accuracy": ..., "n": ..., "qtype/<type>": ...}`` (one entry per question type present).
    """
    if len(samples) != len(predictions):
        raise ValueError(f"score: {len(samples)} samples but {len(predictions)} predictions")
    if not samples:
        raise ValueError("score: no samples")
    per: dict[str, list[float]] = {}
    values = []
    for s, p in zip(samples, predictions, strict=True):
        v = item_score(s.task, p, s.answer)
        values.append(v)
        per.setdefault(s.qtype, []).append(v)
    out = {"accuracy": 100.0 * sum(values) / len(values), "n": float(len(values))}
    out.update({f"qtype/{k}": 100.0 * sum(v) / len(v) for k, v in sorted(per.items())})
    return out
