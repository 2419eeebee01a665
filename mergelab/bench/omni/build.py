"""Build the omni zoo of one seed: tokenizer and processor, the text-only base, three modality experts per setting.

Layout under ``<zoo>/omni/seed<k>/`` (every model directory also holds the processor, so
``AutoModelForImageTextToText`` / ``AutoProcessor`` load it after ``import mergelab``)::

    base/                       the base (all three towers at their seeded init; the connectors aligned when the
                                plan's ``base_align_steps`` asks)
    experts/<setting>/<m>/      expert of modality m: full weights (LoRA merged in), all towers
    experts/lora/<m>/adapter/   the LoRA expert as a peft adapter (connector in modules_to_save)
    merge/base/                 the base without tower tensors (the engine's base for modality merging)
    merge/<setting>/<m>/        the expert with only the LLM and its own tower
    build.json                  the plan, seconds per step, the training losses' last values

The ``merge/`` layout lets the engine merge the shared LLM with any method and carry each tower, unchanged, from
the one expert that holds it (``carry_unique=True``); LoRA experts enter as their weight deltas ``scaling * B @ A``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergelab.bench.omni import data
from mergelab.bench.omni.modeling import OmniSize, build_model, build_processor, build_tokenizer
from mergelab.bench.omni.train import BASE_TRAINABLE, FULL_TRAINABLE, TOWERS, connector_pattern, train
from mergelab.bench.train import TrainConfig

SETTINGS = ("lora", "full")
"""Expert settings: LoRA on the LLM (the paper's) and a full fine-tune of the decoder's linear weights."""


@dataclass(frozen=True)
class OmniPlan:
    """What one seed's omni zoo is built from.

    The defaults are screen 6F in docs/omni.md: the base's three connectors aligned after its text-only run
    (300 steps), and experts trained as in screen 5's plan E (other media on 75% of the items, a quarter lettered,
    450 steps for the video expert) with the connector at the LoRA's learning rate. On three seeds (ten methods)
    its best merge leads the best single-modality model by 5.6 points on the cross-modal average, and on five
    seeds it leads on every seed (plan E: 0.3 below on three seeds, ahead on two of five).

    Attributes:
        size: the model architecture.
        described: text-only described items the base trains on.
        base: base training (whole LLM).
        per_task: training items per single-modality task (each expert trains on its modality's tasks, questions
            with :data:`~mergelab.bench.omni.data.TRAIN_LEADS`).
        replay: described items mixed into each expert's training set, as a fraction of its task items (keeps the
            base's text skills: the lettered answers, the question forms).
        other_media: share of an expert's task items that also carry the other two modalities' media
            (:func:`~mergelab.bench.omni.data.with_other_media`).
        lettered: share of an expert's task items asked with lettered options and answered by the letter
            (:func:`~mergelab.bench.omni.data.as_lettered`); left out of the plan's dict when 0.
        align_steps: leading steps of each expert's run that train only its connector (the LLM's trainables
            frozen, the schedule running on: a LLaVA-style alignment stage); left out of the plan's dict when 0.
        connector_lr: an expert connector's learning rate as a multiple of its setting's ``lr``; left out when 1.
        expert_steps: ``(modality, steps)`` pairs overriding the setting's ``steps`` for that modality's expert;
            left out when empty.
        base_align_steps: steps of the base's connector alignment (0: none; left out of the plan's dict then): after
            its text-only run, the base's three connectors train together, the LLM frozen, on every task's items
            with all three media (a LLaVA-style stage 1 for each tower, on the base everyone fine-tunes from), so
            that every expert starts from connectors that feed the LLM what it reads, and sees the other media in
            its training through connectors like those the merged model holds (see docs/omni.md, screen 6).
        base_align_per_task: items per task of that stage (train split, the experts' question leads).
        base_align_lr: its learning rate (AdamW, no weight decay, the base's warmup and a cosine schedule).
        lora: LoRA expert training (``lora_r > 0``).
        full: full-FT expert training (``trainable`` = the decoder's linear weights).
        settings: which expert settings to build.
        vocab_size: BPE target size.
    """

    size: OmniSize = field(default_factory=OmniSize)
    described: int = 4000
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, batch_size=32, lr=2e-3,
                                                                  warmup_steps=20, trainable=BASE_TRAINABLE))
    per_task: int = 600
    replay: float = 0.25
    other_media: float = 0.75
    lettered: float = 0.25
    align_steps: int = 0
    connector_lr: float = 1.0
    expert_steps: tuple[tuple[str, int], ...] = (("video", 450),)
    base_align_steps: int = 300
    base_align_per_task: int = 300
    base_align_lr: float = 1e-2
    lora: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=16, lr=2e-3,
                                                                  warmup_steps=20, lora_r=8, lora_alpha=16))
    full: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=16, lr=5e-4,
                                                                  warmup_steps=20, trainable=FULL_TRAINABLE))
    settings: tuple[str, ...] = SETTINGS
    vocab_size: int = 640

    @classmethod
    def quick(cls) -> OmniPlan:
        """A test-sized plan: the tiny architecture, short runs, LoRA only (the expert levers at their old
        defaults, so quick zoos built before them keep their plan)."""
        tiny = dict(batch_size=8, warmup_steps=5)
        return cls(size=OmniSize.tiny(), described=400, per_task=80, settings=("lora",), other_media=0.5,
                   lettered=0.0, connector_lr=1.0, expert_steps=(), base_align_steps=0,
                   base=TrainConfig(steps=30, lr=2e-3, trainable=BASE_TRAINABLE, **tiny),
                   lora=TrainConfig(steps=30, lr=3e-3, lora_r=4, lora_alpha=8, **tiny),
                   full=TrainConfig(steps=30, lr=1e-3, trainable=FULL_TRAINABLE, **tiny))

    def to_dict(self) -> dict[str, Any]:
        out = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in asdict(self).items()}
        for name, default in _LATER_FIELDS.items():  # zoos built before these fields keep their plan
            if getattr(self, name) == default:
                del out[name]
        out.update({"expert_steps": [list(p) for p in self.expert_steps]} if self.expert_steps else {})
        return out

    def expert_config(self, setting: str, modality: str, seed: int) -> TrainConfig:
        """The training run of ``setting``'s ``modality`` expert on zoo seed ``seed``."""
        base_cfg = self.lora if setting == "lora" else self.full
        steps = dict(self.expert_steps).get(modality, base_cfg.steps)
        return TrainConfig(**{**base_cfg.to_dict(), "steps": steps,
                              "seed": seed * 100 + list(data.MODALITIES).index(modality)})


_LATER_FIELDS: dict[str, Any] = {"lettered": 0.0, "align_steps": 0, "connector_lr": 1.0, "expert_steps": (),
                                  "base_align_steps": 0, "base_align_per_task": 300, "base_align_lr": 1e-2}
"""Plan fields added after zoos were shipped, and their defaults: left out of :meth:`OmniPlan.to_dict` at them."""


def seed_dir(zoo: str | Path, seed: int) -> Path:
    """``<zoo>/omni/seed<seed>``."""
    return Path(zoo) / "omni" / f"seed{seed}"


def _save(model: Any, processor: Any, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _strip(src: Path, dst: Path, keep: str | None) -> None:
    """Copy checkpoint ``src`` to ``dst`` without the tower tensors, except those of tower prefix ``keep``."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    towers = tuple(TOWERS.values())
    kept = {k: v for k, v in tensors.items() if not k.startswith(towers) or (keep and k.startswith(keep))}
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())


def build_base(root: Path, plan: OmniPlan, seed: int, device: str = "auto") -> dict[str, Any]:
    """Train and save the base (and its stripped copy); returns its log entry."""
    tok = build_tokenizer(data.corpus(seed), plan.vocab_size)
    processor = build_processor(tok)
    model = build_model(tok, plan.size, seed=seed)
    cfg = TrainConfig(**{**plan.base.to_dict(), "seed": seed})
    res = train(model, processor, data.described_samples(plan.described, seed), cfg, device=device)
    entry: dict[str, Any] = {"seconds": res.seconds, "loss": res.losses[-1]}
    model = res.model
    if plan.base_align_steps:
        al = align_connectors(model, processor, plan, seed, device)
        model = al.model
        entry.update(align_seconds=al.seconds, align_loss=al.losses[-1])
        entry["seconds"] += al.seconds
    _save(model.to("cpu"), processor, root / "base")
    _strip(root / "base", root / "merge" / "base", None)
    return entry


def align_samples(plan: OmniPlan, seed: int) -> list[data.OmniSample]:
    """The base's connector-alignment items: ``base_align_per_task`` train items of every task (the experts'
    question leads), each carrying all three media (the others from unrelated scenes)."""
    items = [s for t in data.TASKS for s in data.task_samples(t, "train", plan.base_align_per_task, seed + 2000,
                                                              leads=True)]
    return data.with_other_media(items, 1.0, seed + 2000)


def align_connectors(model: Any, processor: Any, plan: OmniPlan, seed: int, device: str = "auto") -> Any:
    """Train ``model``'s three connectors together, everything else frozen (plan ``base_align_*``); returns the
    :class:`~mergelab.bench.train.TrainResult`."""
    pattern = "|".join(connector_pattern(m) for m in data.MODALITIES)
    cfg = TrainConfig(steps=plan.base_align_steps, batch_size=plan.lora.batch_size, lr=plan.base_align_lr,
                      warmup_steps=plan.base.warmup_steps, trainable=pattern, seed=seed + 2000)
    return train(model, processor, align_samples(plan, seed), cfg, device=device)


def build_expert(root: Path, plan: OmniPlan, seed: int, setting: str, modality: str,
                 device: str = "auto") -> dict[str, Any]:
    """Train one expert from the saved base and save it in every form (see the module docstring)."""
    from mergelab.bench.omni.classes import OmniProcessor, OmniThinkerForConditionalGeneration

    processor = OmniProcessor.from_pretrained(root / "base")
    model = OmniThinkerForConditionalGeneration.from_pretrained(root / "base", use_safetensors=True)
    tasks = [t for t, (m, _, _) in data.TASKS.items() if m == modality]
    samples = [s for t in tasks for s in data.task_samples(t, "train", plan.per_task, seed, leads=True)]
    samples = data.as_lettered(samples, plan.lettered, seed) if plan.lettered else samples
    samples = data.with_other_media(samples, plan.other_media, seed) if plan.other_media else samples
    samples += data.described_samples(int(plan.replay * len(samples)), seed + 1000)
    cfg = plan.expert_config(setting, modality, seed)
    res = train(model, processor, samples, cfg, connector=modality, device=device, connector_lr=plan.connector_lr,
                align_steps=plan.align_steps)
    out = root / "experts" / setting / modality
    trained = res.model.to("cpu")
    if setting == "lora":
        trained.save_pretrained(out / "adapter")
        trained = trained.merge_and_unload()
    _save(trained, processor, out)
    _strip(out, root / "merge" / setting / modality, TOWERS[modality])
    return {"seconds": res.seconds, "loss": res.losses[-1], "trainable": res.trainable_params}


def usable_jobs(jobs: int | None, width: int) -> int:
    """Worker processes for ``width`` independent jobs: ``jobs``, or when None the cores this process may run on
    (``os.sched_getaffinity``), capped at ``width`` and at least 1."""
    n = len(os.sched_getaffinity(0)) if jobs is None else jobs
    return max(1, min(n, width))


def _expert_job(args: tuple[str, OmniPlan, int, str, str, str]) -> tuple[str, str, dict[str, Any]]:
    root, plan, seed, setting, modality, device = args
    torch.set_num_threads(1)
    return setting, modality, build_expert(Path(root), plan, seed, setting, modality, device)


def build(zoo: str | Path, seed: int = 0, plan: OmniPlan | None = None, *, jobs: int | None = 1,
          device: str = "auto", log: Any = print) -> Path:
    """Build whatever of seed ``seed``'s omni zoo is missing (see the module docstring); returns its directory.

    Args:
        zoo: the zoo root.
        seed: the seed (base init, data order, LoRA init).
        plan: sizes and training settings (default :class:`OmniPlan`).
        jobs: expert trainings run in this many processes (one torch thread each; None: the usable cores, see
            :func:`usable_jobs`), the longest runs (most steps) started first; the results are logged and stored in
            the plan's order.
        device: ``auto``, ``cpu`` or ``cuda``.
        log: called with one line per finished step.
    """
    plan = plan or OmniPlan()
    root = seed_dir(zoo, seed)
    manifest = root / "build.json"
    info: dict[str, Any] = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if info.get("plan") not in (None, json.loads(json.dumps(plan.to_dict()))):  # as the manifest stores it
        raise ValueError(f"{root}: built with another plan; use another --zoo or delete it")
    info["plan"] = plan.to_dict()
    t0 = time.perf_counter()
    if not (root / "base" / "model.safetensors").is_file():
        info["base"] = build_base(root, plan, seed, device)
        log(f"omni seed {seed}: base in {info['base']['seconds']:.0f} s (loss {info['base']['loss']:.3f})")
    todo = [(str(root), plan, seed, s, m, device) for s in plan.settings for m in data.MODALITIES
            if not (root / "merge" / s / m / "model.safetensors").is_file()]
    experts = info.setdefault("experts", {})
    results: Sequence[tuple[str, str, dict[str, Any]]]
    workers = usable_jobs(jobs, len(todo))
    if workers > 1:  # longest first, so that no worker is left with a long run at the end
        order = sorted(range(len(todo)), key=lambda i: -plan.expert_config(todo[i][3], todo[i][4], seed).steps)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            done = dict(zip(order, pool.map(_expert_job, [todo[i] for i in order]), strict=True))
        results = [done[i] for i in range(len(todo))]
    else:
        results = [_expert_job(t) for t in todo]
    for setting, modality, entry in results:
        experts[f"{setting}/{modality}"] = entry
        log(f"omni seed {seed}: {setting} {modality} expert in {entry['seconds']:.0f} s (loss {entry['loss']:.3f})")
    info["build_seconds"] = info.get("build_seconds", 0.0) + time.perf_counter() - t0
    root.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(info, indent=1, sort_keys=True))
    return root
