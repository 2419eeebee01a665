"""Online composition of the omni experts (ModelCompose, Chen et al. 2024, arXiv:2402.12750): NaiveMC and DAMC.

The paper's Table 5 lists two *online composing* baselines next to the static merges: the experts are not merged
into one set of weights; every expert's LLM delta is kept (N times the storage of one delta) and combined at
inference. What this module builds, on the omni benchmark's experts (:mod:`mergelab.bench.omni.build`):

* **The composed model** is the base thinker with each modality's tower and connector taken from that modality's
  expert, bit for bit (the merges' ``owner`` rule), and a forward hook on every linear layer of the shared LLM
  (``model.language_model.*``) that some expert changed. The hook keeps the experts' dense deltas
  ``dW_i = W_i - W_0`` (and ``db_i`` for biases): for a LoRA expert ``W_i`` is its full checkpoint, the adapter
  merged in by peft, so ``dW_i`` is ``scaling * B_i @ A_i`` up to float32 rounding; for a full fine-tune, the
  fine-tuned weight minus the base's. The layer's output becomes ``W_0 x + b_0 + delta(x)`` with, per token:
* **NaiveMC** (activation averaging): ``delta(x) = sum_i w_i (dW_i x + db_i)``, ``w_i = 1/N`` unless given; every
  token, every layer. This is ModelCompose's ``merge_default_weights='mean'`` forward (each LoRA branch computed
  and the branch outputs averaged). Each hooked layer is linear in its weight, so NaiveMC's outputs equal the
  delta-mode ``weight_average`` merge (``W_0 + mean_i dW_i``) up to float rounding: it is the weight average
  computed online. The paper's static Weight Avg differs from it because the official modality script averages
  the raw LoRA factors (``mean B @ mean A``, the table's ``lora/weight_average/factors``), not their products.
* **DAMC** (decoupled): a position holding a media token of modality ``m`` (the processor's image, audio or video
  pad token) gets expert ``m``'s delta alone, ``delta(x) = dW_m x + db_m``, in every hooked layer; every other
  position (the text, and every generated token) gets the NaiveMC mean.

How this differs from ModelCompose's DAMC: there each expert is trained with two LoRAs (``lora_strategy
modal+language``: one for its modality's tokens, one for the text) and learned modality prefix/suffix tokens, and
the text goes through the experts' language LoRAs combined with tuned per-expert scales (its "adaptive parameter
adjustment"). Our experts have one LoRA (or one full fine-tune) for all tokens, so DAMC here only routes by token
position with the experts as trained: no decoupled training, no prefix tokens, equal weights for the text.
Like ModelCompose (whose decoding steps carry no modality mask), generated tokens always take the mean.

Entry points: :func:`compose` (any base and experts by modality), :func:`compose_seed` (a seed directory of the
omni zoo); the table's ``compose/<mode>/<setting>`` columns (:mod:`mergelab.bench.omni.table`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from mergelab.bench.omni import data
from mergelab.bench.omni.classes import OmniThinkerForConditionalGeneration
from mergelab.bench.omni.train import TOWERS
from mergelab.hf import resolve_device

MODES = ("naivemc", "damc")
"""The composition modes: activation averaging (NaiveMC) and per-modality token routing (DAMC)."""

LLM_PREFIX = "model.language_model."
"""Prefix of the shared LLM's modules, whose linear layers get the experts' deltas."""

MEDIA_TOKENS = {"image": "image_token_id", "audio": "audio_token_id", "video": "video_token_id"}
"""Each modality's media (pad) token, as the config attribute that holds its id."""


@dataclass
class Routing:
    """Which composed expert owns each position of the current forward pass (set by a pre-hook on the model).

    Attributes:
        owner: ``(batch, tokens)`` long tensor: the index of the expert whose modality's media token is at that
            position, -1 for every other token; None when the forward got no ``input_ids``.
    """

    owner: Tensor | None = None


class DeltaHook:
    """Forward hook of one linear layer: adds the experts' delta outputs, averaged (NaiveMC) or routed (DAMC).

    Args:
        dw: ``(N, out, in)`` weight deltas.
        db: ``(N, out)`` bias deltas, or None.
        weights: ``(N,)`` weights of the mean.
        mode: ``naivemc`` or ``damc``.
        routing: the shared per-forward :class:`Routing` (read by ``damc``).
    """

    def __init__(self, dw: Tensor, db: Tensor | None, weights: Tensor, mode: str, routing: Routing) -> None:
        self.dw, self.db, self.weights, self.mode, self.routing = dw, db, weights, mode, routing

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        d = torch.stack([F.linear(x, self.dw[i].to(x), None if self.db is None else self.db[i].to(x))
                         for i in range(len(self.dw))])
        out = torch.tensordot(self.weights.to(x), d, dims=1)
        owner = self.routing.owner
        if self.mode == "damc" and owner is not None:
            if owner.shape != x.shape[:-1]:
                raise RuntimeError(f"DAMC routing of shape {tuple(owner.shape)} does not match the layer input "
                                   f"{tuple(x.shape)}")
            for i in range(len(d)):
                out = torch.where((owner == i).unsqueeze(-1), d[i], out)
        return output + out


@dataclass
class Composition:
    """A composed model and what it keeps.

    Attributes:
        model: the base thinker with owned towers and the delta hooks (``generate`` works as on any thinker).
        mode: ``naivemc`` or ``damc``.
        experts: the experts' modalities, in order.
        weights: the mean's weight per expert.
        layers: the hooked linear layers (those some expert changed).
        stored: delta parameters kept (every expert's, on every hooked layer).
        handles: the hooks' removable handles (:meth:`remove`).
    """

    model: Any
    mode: str
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    layers: tuple[str, ...]
    stored: int
    handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the hooks: the model is the base with the owned towers again."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of the safetensors files of checkpoint directory ``path``."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors weights")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def llm_deltas(model: nn.Module, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
               ) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{linear layer: (dW (N, out, in), db (N, out) or None)}`` of the shared LLM's layers some expert changed.

    Raises:
        ValueError: an expert changes an LLM tensor that is not a linear layer's (a norm, the embeddings, the LM
            head): composition combines linear layers' outputs only.
    """
    towers = tuple(TOWERS.values())
    covered: set[str] = set()
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and name.startswith(LLM_PREFIX)):
            continue
        w, b = f"{name}.weight", f"{name}.bias"
        covered |= {w, b}
        dw = torch.stack([e[w].float() - base[w].float() for e in experts])
        db = torch.stack([e[b].float() - base[b].float() for e in experts]) if b in base else None
        db = db if db is not None and bool(db.any()) else None
        if bool(dw.any()) or db is not None:
            out[name] = (dw, db)
    other = [k for k in base if not k.startswith(towers) and k not in covered
             and any(not torch.equal(e[k], base[k]) for e in experts)]
    if other:
        raise ValueError(f"experts change LLM tensors outside linear layers ({', '.join(other[:3])}); online "
                         "composition combines linear layers' outputs only")
    return out


def compose(base: str | Path, experts: Mapping[str, str | Path], mode: str = "naivemc", *,
            weights: Sequence[float] | None = None, device: str = "cpu") -> Composition:
    """Compose ``experts`` (``{modality: full checkpoint directory}``) on ``base`` at inference (module docstring).

    Args:
        base: the base thinker's directory.
        experts: one expert per modality (``image``, ``audio``, ``video``), each a full checkpoint (a LoRA expert
            with its adapter merged in, as the zoo saves it).
        mode: ``naivemc`` or ``damc``.
        weights: the mean's weight per expert (default ``1/N`` each).
        device: where the model runs: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).

    Returns:
        The :class:`Composition`; its ``model`` is in eval mode on ``device``.

    Raises:
        ValueError: an unknown mode or modality, no experts, weights of the wrong length, or an expert changing a
            non-linear LLM tensor.
    """
    if mode not in MODES:
        raise ValueError(f"unknown composition mode {mode!r}; known: {MODES}")
    names = tuple(experts)
    unknown = [m for m in names if m not in TOWERS]
    if not names or unknown:
        raise ValueError(f"compose: experts by modality {sorted(TOWERS)} needed, got {list(names)}")
    w = tuple(float(x) for x in weights) if weights is not None else (1.0 / len(names),) * len(names)
    if len(w) != len(names):
        raise ValueError(f"compose: {len(w)} weights for {len(names)} experts")
    dev = resolve_device(device)
    model = OmniThinkerForConditionalGeneration.from_pretrained(base, use_safetensors=True)
    base_sd = read_weights(base)
    states = [read_weights(experts[m]) for m in names]
    owned = {k: v for m, s in zip(names, states, strict=True) for k, v in s.items() if k.startswith(TOWERS[m])}
    bad = model.load_state_dict(owned, strict=False).unexpected_keys
    if bad:
        raise ValueError(f"compose: tower tensors the model does not have: {bad[:3]}")
    deltas = llm_deltas(model, base_sd, states)
    routing = Routing()
    token_ids = {i: int(getattr(model.config, MEDIA_TOKENS[m])) for i, m in enumerate(names)}

    def route(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            routing.owner = None
            return
        owner = torch.full_like(ids, -1)
        for i, tok in token_ids.items():
            owner[ids == tok] = i
        routing.owner = owner

    modules = dict(model.named_modules())
    wt = torch.tensor(w)
    handles = [model.register_forward_pre_hook(route, with_kwargs=True)]
    handles += [modules[n].register_forward_hook(DeltaHook(dw.to(dev), None if db is None else db.to(dev), wt, mode,
                                                           routing))
                for n, (dw, db) in deltas.items()]
    stored = sum(dw.numel() + (0 if db is None else db.numel()) for dw, db in deltas.values())
    return Composition(model.to(dev).eval(), mode, names, w, tuple(deltas), stored, handles)


def parse_modes(text: str) -> tuple[str, ...]:
    """``"naivemc,damc"`` -> ``("naivemc", "damc")``; ``"none"`` or ``""`` -> ``()`` (the command-line form)."""
    return tuple(m for m in text.split(",") if m and m != "none")


def compose_seed(root: str | Path, setting: str, mode: str, *, device: str = "cpu",
                 modalities: Sequence[str] = data.MODALITIES) -> Composition:
    """:func:`compose` the ``setting`` experts (``lora`` or ``full``) of an omni zoo seed directory ``root``."""
    root = Path(root)
    return compose(root / "base", {m: root / "experts" / setting / m for m in modalities}, mode, device=device)


__all__ = ["MODES", "Composition", "DeltaHook", "Routing", "compose", "compose_seed", "llm_deltas", "parse_modes",
           "read_weights"]
