"""Loader of the offline benchmark's JSONL splits (written by :mod:`mergelab.bench`).

Expected layout (``data_root`` defaults to :func:`mergelab.bench.data.default_data_root`, i.e. ``$MERGELAB_DATA``
or ``~/.cache/mergelab/data``)::

    <data_root>/<task>/<variant>/<split>.jsonl           # task: vqa | geometry | chart | ocr | grounding
    <data_root>/<task>/<variant>/images/<split>/<id>.png  # variant: shifted (benchmark) | generic (forgetting)

Each line holds ``id, task, variant, split, image, question, answer, answers, metric, meta``; ``image`` is relative
to the JSONL's directory; ``metric`` is ``"exact_match"``, ``"relaxed_accuracy"`` or ``"iou50"``.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.evaluators.loaders.common import Sample, env_path, field_of, image_path, iter_jsonl

OFFLINE_METRICS = ("exact_match", "relaxed_accuracy", "iou50")


def default_offline_root() -> Path:
    """The offline benchmark's data root: ``mergelab.bench.data.default_data_root()`` when available."""
    try:
        from mergelab.bench.data import default_data_root
    except ImportError:
        return env_path("MERGELAB_DATA", "~/.cache/mergelab/data")
    return Path(default_data_root())


def load_offline(
    data_root: Path, *, task: str, variant: str, split: str, limit: int | None = None
) -> list[Sample]:
    """Read ``<data_root>/<task>/<variant>/<split>.jsonl`` into samples (images are checked, not opened).

    Args:
        data_root: The benchmark's data root.
        task: The benchmark task (``vqa``, ``geometry``, ``chart``, ``ocr``, ``grounding``).
        variant: ``"shifted"`` or ``"generic"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        limit: Keep the first ``limit`` samples.

    Returns:
        The samples in file order.

    Raises:
        FileNotFoundError: the JSONL or one of its images is missing (the message names the path).
        ValueError: a line is not valid JSON, lacks a field or names an unknown metric.
    """
    path = Path(data_root) / task / variant / f"{split}.jsonl"
    samples: list[Sample] = []
    for n, rec in iter_jsonl(
        path, f"offline split (run `mergelab bench build`; expected {task}/{variant}/{split})"
    ):
        where = f"{path}:{n}"
        metric = str(field_of(rec, "metric", where))
        if metric not in OFFLINE_METRICS:
            raise ValueError(f"{where}: unknown metric {metric!r}; expected one of {OFFLINE_METRICS}")
        answers = rec.get("answers") or [field_of(rec, "answer", where)]
        img = rec.get("image")
        samples.append(
            Sample(
                id=str(field_of(rec, "id", where)),
                question=str(field_of(rec, "question", where)),
                references=[str(a) for a in answers],
                image=image_path(path.parent, str(img), where) if img else None,
                meta=dict(rec.get("meta") or {}),
                metric=metric,
            )
        )
        if limit is not None and len(samples) >= limit:
            break
    return samples
