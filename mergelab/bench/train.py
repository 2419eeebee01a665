"""Training loops for the offline benchmark's tiny Qwen2-VL: base, full fine-tuning and LoRA experts, mixture.

Plain PyTorch loops over ``transformers``/``peft`` models: AdamW with linear warmup then cosine decay
(``transformers.get_cosine_schedule_with_warmup``), the loss on answer tokens only (prompt and padding labelled
-100), gradient clipping, deterministic given the seed (the batch order comes from a private ``torch.Generator``).
CPU by default, CUDA when present (``device="auto"``).

Expert settings follow the OptMerge paper (arXiv:2505.19892, section 5.1: full fine-tuning experts of
InternVL2.5, LoRA experts of Qwen2-VL):

* full fine-tuning updates the language model's decoder layers; the vision tower, the token embeddings and the
  LM head stay frozen, which are exactly the tensors the ``qwen2_vl`` merge preset resets to the base, so an
  expert's skill lives in the tensors that merging combines;
* LoRA (rank 8 by default) on the language model's linear layers only, saved as a real peft adapter.

Small learning rates and short runs keep the drift from the base small: small drift makes experts mergeable.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mergelab.bench.modeling import IMAGE_SIZE, build_prompt, image_tokens, to_rgb, training_ids
from mergelab.hf import resolve_device

LM_LINEAR_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
"""peft ``target_modules`` regex: every linear layer of the language model (LLaMA-Factory's ``lora_target: all``)."""

DECODER_LAYERS = r"model\.language_model\.layers\..*"
"""Parameters a full fine-tune updates: the language model's decoder layers (attention, MLP, their norms)."""

LANGUAGE_MODEL = r"model\.language_model\..*|lm_head\..*"
"""Parameters the base trains: the whole language model (embeddings, decoder layers, final norm) and the LM head;
the vision tower keeps its initialisation, like the frozen pretrained encoder of a real MLLM (docs/benchmark-zoo.md:
training it from scratch with the language model collapses its features)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak AdamW learning rate.
        warmup_steps: linear warmup before the cosine decay to 0.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: max global gradient norm (0 disables clipping).
        seed: seeds the batch order (and LoRA's initialisation).
        trainable: regex (``re.match``) of the parameter names to update; None trains everything.
        lora_r: LoRA rank; 0 means full fine-tuning (with ``trainable``).
        lora_alpha: LoRA alpha (scaling alpha / r).
        lr_scale: ``(regex, factor)`` pairs: parameters whose name matches (``re.match``, first pair wins) train
            at ``factor * lr``, e.g. ``(("model\\.visual\\.", 0.1),)`` for a slower vision tower.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    trainable: str | None = None
    lora_r: int = 0
    lora_alpha: int = 16
    lr_scale: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["lr_scale"]:
            del d["lr_scale"]  # keeps the zoo fingerprints of configs without it unchanged
        else:
            d["lr_scale"] = [list(p) for p in d["lr_scale"]]
        return d


@dataclass
class Encoded:
    """A training set tokenized once: token ids with a single image placeholder, prompt lengths, uint8 images.

    ``images`` holds each distinct image once and ``image_index`` maps every example to its row (examples that
    share one image object, such as the blank image of text-only items, store and encode it once); empty means
    one image per example, in order."""

    ids: list[list[int]]
    n_prompt: list[int]
    images: torch.Tensor  # (distinct images, 3, H, W) uint8
    weights: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # per-example sampling weight
    image_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> torch.Tensor:
        """``image_index`` in full: every example's row of ``images``."""
        return self.image_index if self.image_index.numel() else torch.arange(len(self))

    def rows(self, idx: Sequence[int]) -> torch.Tensor:
        """The ``images`` rows of examples ``idx``."""
        return self.index()[list(idx)]


def encode(samples: Sequence[Any], processor: Any, weights: Sequence[float] | None = None) -> Encoded:
    """Tokenize ``samples`` (objects with ``image``, ``question``, ``answer``) for :func:`train`.

    Args:
        samples: the examples; images are converted to 112x112 RGB.
        processor: the benchmark's Qwen2-VL processor (chat template attached).
        weights: optional per-example sampling weights (default uniform).
    """
    if not samples:
        raise ValueError("encode: no training samples")
    ids, n_prompt, images, rows = [], [], [], []
    seen: dict[int, tuple[int, Any]] = {}  # id() of an image object -> (its row, the object, kept alive)
    for s in samples:
        if not str(getattr(s, "answer", "")):
            raise ValueError(f"sample {getattr(s, 'id', '?')!r}: empty answer")
        i, n = training_ids(processor, s.question, s.answer)
        ids.append(i)
        n_prompt.append(n)
        image = s.image
        if id(image) not in seen:
            seen[id(image)] = (len(images), image)
            images.append(np.asarray(to_rgb(image), dtype=np.uint8))
        rows.append(seen[id(image)][0])
    w = torch.ones(len(ids)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64).float()
    if w.numel() != len(ids) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"encode: weights must be {len(ids)} non-negative numbers with a positive sum")
    return Encoded(ids, n_prompt, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), w,
                   _image_index(torch.tensor(rows), len(images)))


def _image_index(rows: torch.Tensor, n_images: int) -> torch.Tensor:
    """``Encoded.image_index`` for examples' image ``rows`` (assigned in order): empty when no image is shared."""
    return rows if n_images < rows.numel() else torch.empty(0, dtype=torch.long)


def concat(parts: Sequence[tuple[Encoded, float]]) -> Encoded:
    """Join encoded sets; each part's examples share its weight (e.g. ``[(vqa, 2.0), (ocr, 1.0)]``)."""
    ids, n_prompt, images, weights, index = [], [], [], [], []
    offset = 0
    for enc, w in parts:
        ids += enc.ids
        n_prompt += enc.n_prompt
        images.append(enc.images)
        weights.append(enc.weights / enc.weights.sum() * float(w) * len(enc))
        index.append(enc.index() + offset)
        offset += enc.images.shape[0]
    return Encoded(ids, n_prompt, torch.cat(images), torch.cat(weights), _image_index(torch.cat(index), offset))


def patchify(images: torch.Tensor, processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL pixel patches of a uint8 batch, identical to ``processor.image_processor`` at 112x112.

    Rescale, normalise, repeat over the temporal patch, and flatten patches in the (merge-window) order of
    ``Qwen2VLImageProcessor``; ``tests/test_bench_model.py`` checks equality with the processor.

    Returns:
        ``(pixel_values (B*64, 1176), image_grid_thw (B, 3))``.
    """
    ip = processor.image_processor
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    b, c, h, w = images.shape
    if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"patchify: images must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {h}x{w}")
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, c, 1, 1)
    x = (images.float() * float(ip.rescale_factor) - mean) / std
    gh, gw = h // p, w // p
    x = x.unsqueeze(1).expand(b, t, c, h, w)
    x = x.reshape(b, 1, t, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = x.reshape(b * gh * gw, c * t * p * p)
    return pixel_values, image_grid(b, processor)


def image_grid(n: int, processor: Any) -> torch.Tensor:
    """``image_grid_thw`` of ``n`` benchmark images: ``(n, 3)`` rows of ``[1, patches high, patches wide]``."""
    side = IMAGE_SIZE // processor.image_processor.patch_size
    return torch.tensor([[1, side, side]] * n, dtype=torch.long)


def mrope_positions(n_before: int, n_after: int, side: int) -> torch.Tensor:
    """Qwen2-VL's 3-D rotary positions ``(3, L)`` of one sequence: ``n_before`` text tokens, one image of
    ``side x side`` merged tokens, ``n_after`` text tokens.

    Text tokens count up on all three axes; the image's tokens share the temporal position ``n_before`` and take
    ``n_before + row`` / ``n_before + column`` as height / width; the text after it resumes at ``n_before + side``.
    The numbers ``Qwen2VLModel.get_rope_index`` computes (tested), without its per-sample Python loop.
    """
    before = torch.arange(n_before).expand(3, -1)
    grid = torch.arange(side)
    image = torch.stack([torch.zeros(side * side, dtype=torch.long), grid.repeat_interleave(side),
                         grid.repeat(side)]) + n_before
    after = torch.arange(n_after).expand(3, -1) + n_before + side
    return torch.cat([before, image, after], dim=1)


def collate(enc: Encoded, idx: Sequence[int], processor: Any, *, pixels: bool = True) -> dict[str, torch.Tensor]:
    """A right-padded training batch: image placeholders expanded, labels -100 outside the answer, and the M-RoPE
    ``position_ids`` (padding at position 0, as ``get_rope_index`` leaves it).

    ``pixels=False`` leaves out ``pixel_values`` (for a run that feeds precomputed image features instead)."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    n_img = image_tokens(processor)
    side = math.isqrt(n_img)
    seqs, labels, positions = [], [], []
    for i in idx:
        ids, n = enc.ids[i], enc.n_prompt[i]
        pos = ids.index(image_id)
        seq = ids[:pos] + [image_id] * n_img + ids[pos + 1 :]
        shift = n_img - 1
        seqs.append(seq)
        labels.append([-100] * (n + shift) + seq[n + shift :])
        positions.append(mrope_positions(pos, len(ids) - pos - 1, side))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    position_ids = torch.zeros((3, len(seqs), width), dtype=torch.long)
    for r, (s, lab, pos_r) in enumerate(zip(seqs, labels, positions, strict=True)):
        input_ids[r, : len(s)] = torch.tensor(s)
        label_t[r, : len(s)] = torch.tensor(lab)
        mask[r, : len(s)] = 1
        position_ids[:, r, : len(s)] = pos_r
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": label_t,
             "mm_token_type_ids": (input_ids == image_id).long(), "position_ids": position_ids}
    if pixels:
        batch["pixel_values"], batch["image_grid_thw"] = patchify(enc.images[enc.rows(idx)], processor)
    else:
        batch["image_grid_thw"] = image_grid(len(idx), processor)
    return batch


def vision_is_frozen(model: Any) -> bool:
    """Whether no parameter of the vision tower (``...visual...``) will be updated."""
    return not any(p.requires_grad for n, p in model.named_parameters() if "visual." in n)


@torch.no_grad()
def image_features(model: Any, processor: Any, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """The vision tower's output (merged image tokens) for a uint8 image batch: ``(N, tokens, hidden)``.

    What ``Qwen2VLModel.get_image_features`` computes inside a forward pass; a run whose vision tower is frozen
    computes it once per training image and passes it as ``mm_encoder_outputs`` (transformers' own hook for
    precomputed encoder outputs) instead of re-encoding every image at every step.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = next(inner.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        pv, grid = patchify(images[start : start + batch_size], processor)
        feats = inner.model.get_image_features(pv.to(dev), grid.to(dev), return_dict=True).pooler_output
        out.append(torch.stack(list(feats)))
    return torch.cat(out)


@dataclass
class TrainResult:
    """What a run returns: the trained model (a ``PeftModel`` for LoRA), seconds, the loss curve."""

    model: Any
    seconds: float
    losses: list[float]
    trainable_params: int


def apply_lora(model: Any, r: int, alpha: int, seed: int) -> Any:
    """Wrap ``model`` with a peft LoRA on the language model's linear layers (vision tower untouched)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LM_LINEAR_TARGETS, bias="none")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)
    finally:
        torch.random.set_rng_state(state)


def train(
    model: Any,
    processor: Any,
    data: Encoded,
    cfg: TrainConfig,
    *,
    device: str | torch.device | None = "auto",
    progress: Callable[[int, float], None] | None = None,
    cache_images: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data`` and return it (wrapped by peft when ``cfg.lora_r > 0``) in eval mode.

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` (modified in place for full fine-tuning).
        processor: its processor (tokenizer and image processor settings).
        data: from :func:`encode` / :func:`concat`; batches are drawn with replacement by weight.
        cfg: hyper-parameters and seed.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
        progress: called as ``progress(step, loss)`` after each step.
        cache_images: when the vision tower is frozen, encode each training image once up front and feed the
            features (the same numbers a forward pass computes; tested) instead of re-encoding every step.
    """
    dev = resolve_device(device)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    elif cfg.trainable is not None:
        pattern = re.compile(cfg.trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(bool(pattern.match(name)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError(f"train: no parameter matches trainable={cfg.trainable!r}")
    model.to(dev).train()
    scales = [(re.compile(rx), float(f)) for rx, f in cfg.lr_scale]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for n, p in named:
        f = next((f for rx, f in scales if rx.match(n)), 1.0)
        groups.setdefault(f, []).append(p)
    # foreach: one fused update per parameter group (the same numbers as the per-tensor loop, fewer kernel calls)
    opt = torch.optim.AdamW([{"params": ps, "lr": cfg.lr * f} for f, ps in groups.items()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.98), foreach=True)
    sched = transformers.get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    losses: list[float] = []
    t0 = time.perf_counter()
    feats = image_features(model, processor, data.images) if cache_images and vision_is_frozen(model) else None
    gen = torch.Generator().manual_seed(cfg.seed)
    with _flush_denormals(dev):
        for step in range(cfg.steps):
            idx = torch.multinomial(data.weights, cfg.batch_size, replacement=True, generator=gen).tolist()
            batch = {k: v.to(dev) for k, v in collate(data, idx, processor, pixels=feats is None).items()}
            if feats is not None:
                rows = data.rows(idx)
                batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats[rows]))}
            losses.append(optimizer_step(model(**batch).loss, opt, sched, params, cfg, step))
            if progress is not None:
                progress(step, losses[-1])
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainResult(model.eval(), seconds, losses, sum(p.numel() for p in params))


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, params: Sequence[torch.Tensor],
                   cfg: TrainConfig, step: int) -> float:
    """One update from ``loss``: check it is finite, backpropagate, clip to ``cfg.grad_clip``, step the optimizer
    and the schedule. Returns the loss value."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"train: loss became {value} at step {step} (lr {cfg.lr})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    return value


@contextlib.contextmanager
def _flush_denormals(dev: torch.device) -> Iterator[None]:
    """Flush denormal floats to zero on the CPU while training (Adam's decaying moments of rarely-used rows are
    slow denormals on x86; it changes no loss on this model, tested), then back to torch's default (off)."""
    on = dev.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


@torch.no_grad()
def greedy_answers(model: Any, processor: Any, samples: Sequence[Any], *, batch_size: int = 64,
                   max_new_tokens: int = 16, keep_special: bool = False) -> list[str]:
    """Greedy answers to ``samples`` (for quick looks, and as training targets with ``keep_special``, which keeps
    tokens such as ``<|box_start|>`` and cuts at the end of the turn); scores always come from
    :func:`mergelab.evaluators.evaluate`."""
    tok = processor.tokenizer
    dev = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts = [build_prompt(processor, s.question) for s in chunk]
        inputs = processor(text=prompts, images=[to_rgb(s.image) for s in chunk], return_tensors="pt",
                           padding=True, padding_side="left")
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1] :]
        if not keep_special:
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
            continue
        stop = {tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=False).strip())
    return out

