"""Training and greedy answering for the omni model: the text-only base and the three modality experts.

* **Base**: the whole language model (embeddings, decoder, final norm, LM head) on text-only *described items*
  (:func:`mergelab.bench.omni.data.described_samples`); every tower keeps its seeded initialisation, frozen like a
  real MLLM's pretrained encoders.
* **Experts** (the paper's modality-merging setting, section 5.1): LoRA on the shared LLM's linear layers only
  (:data:`mergelab.bench.train.LM_LINEAR_TARGETS` matches no tower module) plus the expert's own connector as
  ``modules_to_save`` (:data:`CONNECTORS`); or, the second setting, a full fine-tune of the decoder layers' linear
  weights plus the connector. Tower bodies stay frozen.

Batches go through the processor (media rendered once per run); the loss is on the answer and the end-of-turn
token only. Hyper-parameters come in a :class:`mergelab.bench.train.TrainConfig`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from mergelab.bench.omni.data import OmniSample, render
from mergelab.bench.omni.modeling import build_prompt
from mergelab.bench.train import LM_LINEAR_TARGETS, TrainConfig, TrainResult, optimizer_step
from mergelab.hf import resolve_device

CONNECTORS: dict[str, tuple[str, ...]] = {
    "image": ("model.visual.merger",),
    "video": ("model.video_visual.merger",),
    "audio": ("model.audio_tower.ln_post", "model.audio_tower.proj"),
}
"""Each modality's connector modules (trained by its expert; ``modules_to_save`` of a LoRA expert)."""

TOWERS: dict[str, str] = {"image": "model.visual.", "video": "model.video_visual.", "audio": "model.audio_tower."}
"""Each modality's tower prefix (body and connector)."""

BASE_TRAINABLE = r"model\.language_model\..*|lm_head\..*"
"""What the base trains: the whole language model and the LM head."""

FULL_TRAINABLE = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"
"""What a full-FT expert trains besides its connector: the decoder layers' linear weights (the tensors the
``llama`` merge policy hands to the method; norms, biases, embeddings and the LM head stay at the base)."""


def connector_pattern(modality: str) -> str:
    """Regex of the parameter names of ``modality``'s connector."""
    return "|".join(re.escape(m) + r"\..*" for m in CONNECTORS[modality])


def batch(processor: Any, samples: Sequence[OmniSample], media: Sequence[dict[str, Any]],
          *, with_answers: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for ``samples`` (``media`` from :func:`mergelab.bench.omni.data.render`).

    With answers: right-padded prompt + answer + end of turn, labels -100 except on the answer tokens. Without:
    left-padded prompts for generation.
    """
    tok = processor.tokenizer
    texts = [build_prompt(processor, s.modalities, s.question) for s in samples]
    if with_answers:
        texts = [t + str(s.answer) + tok.eos_token for t, s in zip(texts, samples, strict=True)]
    kw: dict[str, list[Any]] = {}
    for m in media:
        for key, values in m.items():
            kw.setdefault(key, []).extend(values)
    out = processor(text=texts, **kw, return_tensors="pt", padding=True,
                    padding_side="right" if with_answers else "left")
    if with_answers:
        labels = torch.full_like(out["input_ids"], -100)
        for r, s in enumerate(samples):
            n = len(tok(str(s.answer) + tok.eos_token, add_special_tokens=False)["input_ids"])
            end = int(out["attention_mask"][r].sum())
            labels[r, end - n : end] = out["input_ids"][r, end - n : end]
        out["labels"] = labels
    return dict(out)


def prepare(model: Any, cfg: TrainConfig, connector: str | None = None) -> Any:
    """Set what trains: LoRA on the LLM's linears plus ``connector``'s modules (``cfg.lora_r > 0``), or the
    parameters matching ``cfg.trainable`` plus the connector. Returns the (possibly peft-wrapped) model."""
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LM_LINEAR_TARGETS,
                          bias="none", modules_to_save=list(CONNECTORS[connector]) if connector else None)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, lcfg)
        finally:
            torch.random.set_rng_state(state)
    pattern = re.compile("|".join(p for p in (cfg.trainable, connector_pattern(connector) if connector else None) if p))
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.fullmatch(name)))
    return model


def train(model: Any, processor: Any, samples: Sequence[OmniSample], cfg: TrainConfig, *,
          connector: str | None = None, device: str | torch.device | None = "auto", connector_lr: float = 1.0,
          align_steps: int = 0) -> TrainResult:
    """Train ``model`` on ``samples`` (drawn uniformly with replacement, seeded) and return it in eval mode.

    The connector and the rest (LoRA factors or full-FT weights) are two AdamW parameter groups: the connector at
    ``connector_lr * cfg.lr`` without weight decay, the rest at ``cfg.lr`` with ``cfg.weight_decay``, both on one
    warmup and cosine schedule over ``cfg.steps``. With ``align_steps`` the first steps train the connector alone
    (the LLM frozen, a LLaVA-style alignment stage); the rest then joins at the schedule's current (decayed) rate.

    Args:
        model: an omni thinker (modified in place; wrapped by peft when ``cfg.lora_r > 0``).
        processor: its processor.
        samples: training items (any mix of media, or none).
        cfg: hyper-parameters; ``cfg.trainable`` is the regex (``re.fullmatch``) of full-FT parameters.
        connector: the modality whose connector trains too (an expert), or None (the base).
        device: ``auto``, ``cpu`` or ``cuda``.
        connector_lr: the connector's learning rate as a multiple of ``cfg.lr``.
        align_steps: leading steps (of ``cfg.steps``) that train only the connector.
    """
    if not samples:
        raise ValueError("train: no samples")
    if align_steps and (connector is None or align_steps >= cfg.steps):
        raise ValueError(f"train: align_steps {align_steps} needs a connector and fewer than {cfg.steps} steps")
    dev = resolve_device(device)
    model = prepare(model, cfg, connector)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("train: nothing to train")
    params = [p for _, p in named]
    conn = re.compile("|".join(re.escape(m) + r"\." for m in CONNECTORS[connector])) if connector else None
    own = [p for n, p in named if conn is not None and conn.search(n)]
    rest = [p for n, p in named if conn is None or not conn.search(n)]
    groups = [g for g in ({"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                          {"params": own, "lr": cfg.lr * connector_lr, "weight_decay": 0.0}) if g["params"]]
    model.to(dev).train()
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), foreach=True)
    sched = transformers.get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    for p in rest if align_steps else ():
        p.requires_grad_(False)
    media = [render(s) for s in samples]
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if align_steps and step == align_steps:
            for p in rest:
                p.requires_grad_(True)
        idx = torch.randint(len(samples), (cfg.batch_size,), generator=gen).tolist()
        inputs = batch(processor, [samples[i] for i in idx], [media[i] for i in idx])
        loss = model(**{k: v.to(dev) for k, v in inputs.items()}).loss
        losses.append(optimizer_step(loss, opt, sched, params, cfg, step))
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainResult(model.eval(), seconds, losses, sum(p.numel() for p in params))


@torch.no_grad()
def answers(model: Any, processor: Any, samples: Sequence[OmniSample], *, batch_size: int = 32,
            max_new_tokens: int = 6) -> list[str]:
    """Greedy answers to ``samples`` (each with its own media), special tokens dropped, stripped."""
    tok = processor.tokenizer
    dev = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        inputs = {k: v.to(dev) for k, v in batch(processor, chunk, [render(s) for s in chunk],
                                                 with_answers=False).items()}
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out
