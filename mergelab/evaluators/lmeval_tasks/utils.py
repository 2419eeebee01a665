"""lm-eval hooks of the offline benchmark's tasks: load a local JSONL split, score with mergelab's own metrics.

Scoring goes through :func:`mergelab.evaluators.tasks.offline_score`, the very function the native runner uses,
so the two differ only in how they generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from mergelab.bench.data import default_data_root, read_split
from mergelab.evaluators.loaders import Sample
from mergelab.evaluators.tasks import offline_score, strip_prediction


def load_split(**kw: Any) -> dict[str, Any]:
    """``custom_dataset`` hook: ``{"test": Dataset}`` of ``<data_root>/<task>/<variant>/<split>.jsonl``."""
    root = Path(kw.get("data_root") or default_data_root())
    limit = kw.get("limit")
    samples = read_split(kw["task"], kw["variant"], kw.get("split", "val"), root,
                         limit=None if limit is None else int(limit), load_images=False)  # fmt: skip
    rows = [{"id": s.id, "question": s.question, "references": s.answers, "metric": s.metric,
             "meta": json.dumps(s.meta), "image": str(s.image)} for s in samples]  # fmt: skip
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    return datasets.DatasetDict({"test": ds})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``process_results`` hook: parse and score the generation exactly as the native runner does."""
    sample = Sample(id=str(doc["id"]), question=doc["question"], answers=list(doc["references"]),
                    image=None, meta=json.loads(doc["meta"] or "{}"), metric=doc["metric"])  # fmt: skip
    prediction = strip_prediction(results[0])  # the offline tasks' parser
    return offline_score(prediction, sample)
