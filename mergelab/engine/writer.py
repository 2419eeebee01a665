"""Output of the streaming merge engine: bounded safetensors shards written as tensors are produced, side files.

:class:`ShardWriter` writes the output as bounded safetensors shards whose headers are computed up front from the
plan, so tensors are streamed to disk as they are produced (no shard buffer in memory). :func:`copy_side_files`
carries the base's config, tokenizer, processor and custom-code (``*.py``, InternVL-style remote code) files over;
:func:`write_model_card` writes the output's ``README.md`` (base, experts, method, parameters, recipe digest,
scores when evaluated), as mergekit's card does.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from mergelab.engine.io import (
    _WEIGHT_INDEXES,
    _WEIGHT_SUFFIXES,
    DTYPE_TO_ST,
    INDEX_NAME,
    SINGLE_NAME,
    MergeError,
    _itemsize,
)

if TYPE_CHECKING:
    from mergelab.engine.recipe import MergeRecipe

MODEL_CARD = "README.md"
_CHUNK = 1 << 22  # elements converted per write when the output dtype differs from the tensor's


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, processor, chat-template, generation and custom-code files from ``src``.

    Every top-level regular file that is not a weight file or a weight index is copied: remote-code checkpoints
    (InternVL's ``modeling_*.py``/``configuration_*.py`` named by ``auto_map`` in ``config.json``) keep their code,
    which transformers still loads only with ``trust_remote_code=True``.

    Returns:
        The copied file names.
    """
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _WEIGHT_INDEXES:
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


@dataclass(frozen=True)
class OutSpec:
    """One output tensor as planned: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


class ShardWriter:
    """Stream tensors into bounded safetensors shards whose layout is fixed up front.

    Because every output tensor's name, dtype and shape is known from the plan, each shard's header is written
    before its data and tensors are appended as they are produced, in plan order: the writer holds no buffer.
    One shard is named ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (the Hugging Face layout).

    Args:
        out_dir: directory to write into (the engine's temporary directory).
        specs: output tensors in the order they will be written.
        max_shard_bytes: a shard's data is kept under this size unless a single tensor is larger.
    """

    def __init__(self, out_dir: Path, specs: Sequence[OutSpec], max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise MergeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = out_dir
        groups: list[list[OutSpec]] = [[]]
        size = 0
        for s in specs:
            if groups[-1] and size + s.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        n = len(groups)
        self.names = (
            [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._plan: list[tuple[int, OutSpec]] = [(gi, s) for gi, g in enumerate(groups) for s in g]
        self._groups = groups
        self._pos = 0
        self._file: Any = None
        self._gi = -1
        self.bytes_written = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(s.nbytes for s in specs)
        self._buf: torch.Tensor | None = None  # conversion buffer of :meth:`_write_cast`

    def _open(self, gi: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for s in self._groups[gi]:
            header[s.name] = {"dtype": DTYPE_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out_dir / self.names[gi], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self.bytes_written += 8 + len(raw)
        self._gi = gi

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (must come in plan order with the planned shape and dtype; a floating
        tensor of another floating dtype is converted on the way, :data:`_CHUNK` elements at a time through one reused
        buffer, with the values of ``tensor.to(dtype)``)."""
        gi, spec = self._plan[self._pos]
        cast = tensor.dtype != spec.dtype and tensor.is_floating_point() and spec.dtype.is_floating_point
        if name != spec.name or (tensor.dtype != spec.dtype and not cast) or tuple(tensor.shape) != spec.shape:
            raise MergeError(
                f"internal: writer expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if gi != self._gi:
            self._open(gi)
        if cast:
            self._write_cast(tensor.detach().reshape(-1), spec.dtype)
        else:
            t = tensor.detach().to("cpu").contiguous()
            if t.numel():
                self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.bytes_written += spec.nbytes
        self.weight_map[name] = self.names[gi]
        self._pos += 1

    def _write_cast(self, flat: torch.Tensor, dtype: torch.dtype) -> None:
        """Write ``flat`` converted to ``dtype`` through one reused CPU buffer (no tensor-sized output copy)."""
        need = min(_CHUNK, flat.numel())
        if self._buf is None or self._buf.dtype != dtype or self._buf.numel() < need:
            self._buf = torch.empty(need, dtype=dtype)
        for a in range(0, flat.numel(), _CHUNK):
            part = flat[a : a + _CHUNK]
            buf = self._buf[: part.numel()]
            buf.copy_(part)
            self._file.write(buf.view(torch.uint8).numpy().data)

    def close(self) -> None:
        """Finish the last shard and write the index (several shards). Every planned tensor must be written."""
        if self._pos != len(self._plan):
            raise MergeError(f"internal: {len(self._plan) - self._pos} planned tensors were never written")
        if self._file is None and self._plan:
            self._open(0)
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            raw = json.dumps(index, indent=2).encode()
            (self.out_dir / INDEX_NAME).write_bytes(raw)
            self.bytes_written += len(raw)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def model_card(recipe: MergeRecipe, *, digest: str | None = None, scores: dict[str, float] | None = None) -> str:
    """The merged checkpoint's ``README.md``: Hugging Face metadata, then base, experts, method, parameters,
    recipe digest, the recipe as YAML (``mergelab merge`` reads it back) and the scores when evaluated.

    Args:
        recipe: the merge's recipe.
        digest: :attr:`MergeRecipe.digest` when known (computing it reads every input once).
        scores: per-task scores (percent) when the merge was evaluated.
    """
    spec = recipe.spec
    meta: dict[str, Any] = {"base_model": recipe.base,
                            "library_name": "peft" if recipe.output == "adapter" else "transformers",
                            "tags": ["mergelab", "merge", recipe.method_name]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---",
             f"# {Path(recipe.base).name}-{recipe.method_name}", "",
             "This is a merge of fine-tuned models created with mergelab"
             + (", written as one PEFT LoRA adapter." if recipe.output == "adapter" else "."), "",
             "## Merge details", "",
             f"- **Method:** `{recipe.method_name}`" + (f" ({spec.description})" if spec.description else ""),
             f"- **Base model:** `{recipe.base}`"]
    if digest:
        lines.append(f"- **Recipe digest:** `{digest}`")
    lines += ["", "### Experts", "", "| name | kind | coefficient | path |", "|---|---|---|---|"]
    for e in recipe.experts:
        coef = "1 (default)" if e.coefficient is None else f"{e.coefficient:g}"
        lines.append(f"| {e.name} | {e.kind} | {coef} | `{e.path}` |")
    lines += ["", "### Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in recipe.hyperparameters.items()]
    if scores:
        lines += ["", "## Evaluation", "", "| task | score |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in scores.items()]
    lines += ["", "## Recipe", "", "The following recipe produced this model (`mergelab merge recipe.yaml --out DIR`):",
              "", "```yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, recipe: MergeRecipe, *, digest: str | None = None,
                     scores: dict[str, float] | None = None) -> None:
    """Write :func:`model_card` as ``out_dir/README.md`` (replacing a base's card copied by
    :func:`copy_side_files`); a checkpoint with custom code (``auto_map`` in ``config.json``) gets a note that it
    loads with ``trust_remote_code=True``."""
    if digest is None:  # the digest when already computed (a cached_property lives in the instance's __dict__)
        digest = vars(recipe).get("digest")
    text = model_card(recipe, digest=digest, scores=scores)
    cfg = out_dir / "config.json"
    if cfg.exists() and "auto_map" in json.loads(cfg.read_text()):
        code = sorted(f.name for f in out_dir.glob("*.py"))
        text += (f"\nThis checkpoint uses custom modelling code ({', '.join(code) or 'auto_map'}); load it with "
                 "`trust_remote_code=True`.\n")
    (out_dir / MODEL_CARD).write_text(text)
