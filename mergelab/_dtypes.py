"""Floating-point dtype names as users write them (``bf16``, ``bfloat16``, ``torch.float16``), in one table.

The merge engine (``dtype``/``compute_dtype`` of a recipe) and the model loader (:func:`mergelab.hf.load_model`)
read dtype names through :func:`parse_dtype`. (The methods validate their own ``compute_dtype`` field against the
four canonical names: :mod:`mergelab.methods` imports only torch.)
"""

from __future__ import annotations

from types import MappingProxyType

import torch

DTYPES: MappingProxyType[str, torch.dtype] = MappingProxyType({
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
})  # fmt: skip
"""Accepted names (lower case, without ``torch.``) -> dtype."""


def parse_dtype(value: str | torch.dtype | None, field: str = "dtype") -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None, ``"auto"`` or ``"none"`` -> None.

    Raises:
        ValueError: an unknown name (one line naming ``field``, the value and the accepted names).
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    v = str(value).lower().removeprefix("torch.")
    if v in ("auto", "none", ""):
        return None
    if v not in DTYPES:
        raise ValueError(f"{field}: unknown dtype {value!r}; use one of {sorted(DTYPES)}")
    return DTYPES[v]
