"""Dataset loaders of the paper's ten evaluation columns, and the :class:`Sample` record every task uses.

Each loader reads local files only and returns a list of :class:`Sample`; a missing file raises
``FileNotFoundError`` naming it. The expected layouts are documented in each loader and in ``docs/evaluators.md``.
The offline benchmark's JSONL splits are read by their own module, :func:`mergelab.bench.data.read_split`.
"""

from __future__ import annotations

from mergelab.evaluators.loaders.common import Sample, open_image
from mergelab.evaluators.loaders.paper import (
    GROUNDING_PROMPT,
    default_paper_root,
    load_chartqa,
    load_gqa,
    load_mathvision_geo,
    load_mathvista_geo,
    load_ocrvqa,
    load_refcoco,
    load_textvqa,
    load_vizwiz,
)

__all__ = [
    "GROUNDING_PROMPT",
    "Sample",
    "default_paper_root",
    "load_chartqa",
    "load_gqa",
    "load_mathvision_geo",
    "load_mathvista_geo",
    "load_ocrvqa",
    "load_refcoco",
    "load_textvqa",
    "load_vizwiz",
    "open_image",
]
