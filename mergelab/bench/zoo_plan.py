"""The offline benchmark's model zoo, part 1 of 3: what the zoo is (its plan, layout, manifest and fingerprints).

The zoo stands in for the OptMerge paper's checkpoints (arXiv:2505.19892: InternVL2.5-1B full fine-tuning experts,
Qwen2-VL-7B LoRA experts, a mixture-trained reference) with tiny Qwen2-VL models trained on the procedural tasks
of :mod:`mergelab.bench.tasks`, following the design the pilots found to behave like the paper:

* the **base** is trained from scratch on the ``generic`` variants of all five tasks (the stand-in for a pretrained
  generalist MLLM);
* each **expert** fine-tunes the base, briefly and at a small learning rate, on the ``shifted`` variant of one task
  (new answer words), once with full fine-tuning of the language model and once with LoRA on its linear layers;
* the **mixture** model fine-tunes the base on all five shifted training sets together with the experts' combined
  step budget (the "mixture training" reference row).

Layout under the zoo root (each model directory is a normal checkpoint that :func:`mergelab.hf.load_model` reads;
a LoRA directory is a peft adapter whose ``base_model_name_or_path`` is ``../../base``)::

    manifest.json
    tokenizer/
    seed0/base/  seed0/full/<task>/  seed0/lora/<task>/  seed0/mixture/
    seed1/...

``manifest.json`` records the plan, and per model its kind, task, seed, training config, train seconds, the SHA-256
of its weights file, a fingerprint of everything it was built from, and its per-task test scores on both variants.

This module holds the facts a build and a reader share: :class:`ZooPlan`, each model's fingerprint computed from the
plan (:func:`base_fingerprint`, :func:`seed_jobs`, :func:`plan_fingerprints`), the manifest's reader and writer, and
the training sets each model trains on (:class:`ZooData`). Building is :mod:`mergelab.bench.zoo_build`; the
benchmark tables are :mod:`mergelab.bench.zoo_table`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mergelab._files import read_json
from mergelab.bench import modeling
from mergelab.bench.lexicon import LEXICON_VERSION, answer_words, described_items, lexicon_items
from mergelab.bench.modeling import TinyQwen2VLConfig
from mergelab.bench.tasks import TASKS, generate
from mergelab.bench.tasks.common import VARIANTS
from mergelab.bench.train import (
    DECODER_LAYERS,
    LANGUAGE_MODEL,
    Encoded,
    TrainConfig,
    concat,
    encode,
    greedy_answers,
)

SETTINGS: tuple[str, ...] = ("full", "lora")
"""The expert settings: full fine-tuning experts and LoRA experts (every seed holds both)."""
KINDS: tuple[str, ...] = (*SETTINGS, "mixture")
"""What a seed holds besides its base: full fine-tuning experts, LoRA experts, the mixture model."""
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_ZOO = Path(__file__).resolve().parent / "zoo"
"""Where the shipped zoo lives (inside the package, so the demo and the tests need no training)."""



@dataclass(frozen=True)
class ZooPlan:
    """Everything a zoo build depends on (hashed into each model's fingerprint).

    Attributes:
        size: the Qwen2-VL architecture.
        vocab_size: BPE vocabulary size for the tokenizer built from the task corpus.
        seeds: one complete zoo (base, experts, mixture) per seed.
        n_train: training samples generated per (task, variant).
        n_eval: test items per task scored into the manifest (None: the whole test split; 300 keeps the build
            short, the benchmark table re-scores on the whole split).
        base: the base's training run (from scratch, generic variants; the language model and LM head train, the
            vision tower keeps its random initialisation as a frozen encoder).
        base_task_weights: sampling weight of each task's generic data for the base.
        full: a full fine-tuning expert's run (decoder layers only).
        lora: a LoRA expert's run.
        mixture_steps_factor: mixture steps = this x ``full.steps`` (the experts' combined budget).
        data_seed: seed of the generated training data.
        full_replay: share of a full expert's training samples drawn from the base's own generic data of every
            task (equal parts); the rest is the expert's shifted task.
        lora_replay: the same for a LoRA expert. Replay keeps an expert's weight change conditional on its own
            task: trained on one task alone, an expert also learns to give that task's answers to every prompt
            (a chart expert answering "90" to "what color is the square?"), and that prior is what a merge
            carries over into the other experts' tasks.
        replay_targets: what the replayed samples are trained to answer: ``"data"``, the generic data's own
            answers (the base's training targets), or ``"base"``, the seed's base's greedy answers to those prompts
            (self-distillation, as in Learning without Forgetting: the replayed part then only asks the expert to
            keep the base's behaviour outside its task, with no "learn the generic variants better" direction that
            every expert would share and a task-arithmetic sum would multiply). Measured on the shipped zoo's
            LoRA experts, it makes better experts but worse merges (``docs/benchmark-zoo.md``).
        replay_items: generic prompts per task labelled by the base when ``replay_targets == "base"``.
        base_lexicon: sampling weight (like ``base_task_weights``) of text-only lexicon items in the base's training
            set: "say pink." -> "pink" for every answer word of every variant, the stand-in for a real language
            model's pretraining (:mod:`mergelab.bench.lexicon`). 0 (off) leaves it out of the plan and the
            fingerprints.
        base_described: total sampling weight (split equally over every task and variant) of text-only
            *described* items in the base's training set: the sample's scene in words before its own question
            (``"the values are 90, 90, 70, 10. what is the value of the second point?"`` -> ``"90"``), so the base
            knows what each question asks for and which words answer it, shifted variants included, without the
            visual skill (:func:`mergelab.bench.lexicon.describe`). 0.5 by default: without it the LoRA experts
            learn their answer words as a prior that ignores the prompt and their merges answer every task with
            one expert's words (``docs/benchmark-zoo.md``). 0 (off) leaves it out of the plan and the
            fingerprints, as in zoos built before it.
    """

    size: TinyQwen2VLConfig = field(default_factory=TinyQwen2VLConfig)
    vocab_size: int = 768
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 2000
    n_eval: int | None = 100
    base: TrainConfig = TrainConfig(steps=900, batch_size=32, lr=1e-3, warmup_steps=50, weight_decay=0.01,
                                    trainable=LANGUAGE_MODEL)
    base_task_weights: tuple[tuple[str, float], ...] = (
        ("vqa", 2.0), ("geometry", 1.0), ("chart", 1.0), ("ocr", 1.0), ("grounding", 1.5))
    full: TrainConfig = TrainConfig(steps=150, batch_size=32, lr=1e-3, warmup_steps=15, trainable=DECODER_LAYERS)
    lora: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=2e-3, warmup_steps=30, lora_r=8, lora_alpha=16)
    mixture_steps_factor: int = 5
    data_seed: int = 0
    full_replay: float = 0.0
    lora_replay: float = 0.0
    replay_targets: str = "data"
    replay_items: int = 400
    base_lexicon: float = 0.0
    base_described: float = 0.5

    _REPLAY_FIELDS = ("full_replay", "lora_replay")  # class constant (no annotation: not a field)
    _REPLAY_TARGETS = ("data", "base")

    @classmethod
    def tiny(cls) -> ZooPlan:
        """A zoo that builds in seconds, for the tests: one seed, a smaller model, few steps."""
        return cls(
            size=TinyQwen2VLConfig.tiny(),
            vocab_size=512,
            seeds=(0,),
            n_train=48,
            n_eval=24,
            base=TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2),
            full=TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, trainable=DECODER_LAYERS),
            lora=TrainConfig(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, lora_r=4, lora_alpha=8),
            mixture_steps_factor=1,
        )

    def __post_init__(self) -> None:
        for name in self._REPLAY_FIELDS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ZooPlan.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.replay_targets not in self._REPLAY_TARGETS:
            raise ValueError(f"ZooPlan.replay_targets must be one of {self._REPLAY_TARGETS}, got {self.replay_targets!r}")
        if self.replay_items < 1:
            raise ValueError(f"ZooPlan.replay_items must be >= 1, got {self.replay_items!r}")
        for name in ("base_lexicon", "base_described"):
            if not 0.0 <= getattr(self, name) < 100.0:
                raise ValueError(f"ZooPlan.{name} must be in [0, 100), got {getattr(self, name)!r}")

    def replay(self, kind: str) -> float:
        """The replay share of an expert of ``kind`` (``"full"`` or ``"lora"``)."""
        return float(getattr(self, f"{kind}_replay"))

    def to_dict(self) -> dict[str, Any]:
        """The plan as the manifest records it (JSON types; options that are off left out, as before they existed)."""
        d = json.loads(json.dumps(asdict(self)))
        for name in self._REPLAY_FIELDS:
            if not d[name]:
                del d[name]  # keeps the plans (and combine_zoos checks) of zoos built before replay unchanged
        if not any(d.get(name) for name in self._REPLAY_FIELDS) or d["replay_targets"] == "data":
            del d["replay_targets"], d["replay_items"]  # the same for zoos built before replay targets
        for name in ("base_lexicon", "base_described"):
            if not d[name]:
                del d[name]  # the same for zoos built before the lexicon
        return d


# ------------------------------------------------------------------------------------------- fingerprints


def fingerprint(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as sorted-key JSON: a model's identity in the manifest."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(plan: ZooPlan, corpus: Sequence[str]) -> str:
    """The tokenizer's fingerprint: its vocabulary size and the corpus it is trained on (:meth:`ZooData.corpus`)."""
    return fingerprint("tokenizer", plan.vocab_size, corpus)


def base_config(plan: ZooPlan, seed: int) -> TrainConfig:
    """The training run of one seed's base: ``plan.base`` with the seed."""
    return replace(plan.base, seed=seed)


def base_fingerprint(plan: ZooPlan, seed: int, tokenizer_fp: str, tasks: Sequence[str] = TASKS) -> str:
    """The fingerprint of one seed's base: the tokenizer, architecture, training run, data and text items."""
    parts: tuple[Any, ...] = ("base", tokenizer_fp, plan.size.to_dict(), base_config(plan, seed).to_dict(),
                              dict(plan.base_task_weights), plan.n_train, plan.data_seed, tuple(tasks))
    if plan.base_lexicon or plan.base_described:  # omitted when off: the fingerprints of earlier zoos hold
        text = {"lexicon": plan.base_lexicon, "described": plan.base_described}
        parts += ({**{k: v for k, v in text.items() if v}, "version": LEXICON_VERSION},)
    return fingerprint(*parts)


@dataclass(frozen=True)
class Job:
    """One model of a seed to train from the seed's base: an expert (full or LoRA) or the mixture."""

    name: str
    kind: str  # "full" | "lora" | "mixture"
    task: str | None  # None for the mixture (all tasks)
    seed: int
    cfg: TrainConfig
    fingerprint: str

    @property
    def cost(self) -> float:
        """Relative training cost (steps x batch), for scheduling the longest jobs first."""
        return float(self.cfg.steps * self.cfg.batch_size)


def seed_jobs(plan: ZooPlan, tasks: Sequence[str], seed: int, base_sha: str, kinds: Sequence[str] = KINDS,
              only: frozenset[str] | None = None) -> list[Job]:
    """One seed's experts and mixture of ``kinds`` (and in ``only``, when given), with their fingerprints.

    Args:
        plan: the zoo's plan.
        tasks: the tasks of the build (an expert per task and kind).
        seed: the zoo seed.
        base_sha: the SHA-256 of the seed's base weights (every job trains from it).
        kinds: which of ``KINDS`` to list.
        only: manifest names to keep (None: all).
    """
    tasks = tuple(tasks)
    jobs: list[Job] = []
    for kind, cfg0 in (("full", plan.full), ("lora", plan.lora)):
        if kind not in kinds:
            continue
        for task in tasks:
            cfg = replace(cfg0, seed=seed * 1000 + TASKS.index(task) if task in TASKS else seed)
            parts: tuple[Any, ...] = (kind, base_sha, cfg.to_dict(), task, plan.n_train, plan.data_seed)
            replay = plan.replay(kind)
            if replay:  # omitted when off, so the fingerprints of zoos built before replay hold
                parts += ({"replay": replay, "tasks": list(tasks)},)
                if plan.replay_targets != "data":
                    parts += ({"replay_targets": plan.replay_targets, "replay_items": plan.replay_items},)
            jobs.append(Job(f"seed{seed}/{kind}/{task}", kind, task, seed, cfg, fingerprint(*parts)))
    if "mixture" in kinds:
        cfg = replace(plan.full, seed=seed * 1000 + 999, steps=plan.full.steps * plan.mixture_steps_factor)
        fp = fingerprint("mixture", base_sha, cfg.to_dict(), tasks, plan.n_train, plan.data_seed)
        jobs.append(Job(f"seed{seed}/mixture", "mixture", None, seed, cfg, fp))
    return [j for j in jobs if only is None or j.name in only]


def plan_fingerprints(plan: ZooPlan, manifest: dict[str, Any]) -> dict[str, str]:
    """Every model's fingerprint as ``plan`` computes it, from the manifest's tasks, tokenizer fingerprint and the
    weights hashes of its bases (what each expert and mixture trains from): equal to the manifest's own
    fingerprints when the zoo is up to date with the plan."""
    tasks, tok_fp = tuple(manifest["tasks"]), manifest["tokenizer"]["fingerprint"]
    out: dict[str, str] = {}
    for seed in plan.seeds:
        base = f"seed{seed}/base"
        out[base] = base_fingerprint(plan, seed, tok_fp, tasks)
        base_sha = manifest["models"][base]["weights"]["model.safetensors"]
        out.update((j.name, j.fingerprint) for j in seed_jobs(plan, tasks, seed, base_sha))
    return out


# --------------------------------------------------------------------------------------------------- manifest


def weights_file(model_dir: Path) -> Path:
    """The weights file of a zoo model directory (a full checkpoint's or a LoRA adapter's)."""
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or adapter_model.safetensors")


def read_manifest(root: str | os.PathLike[str] = DEFAULT_ZOO) -> dict[str, Any]:
    """The zoo's ``manifest.json``, with a one-line error naming the file when absent or unreadable."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no zoo manifest (run `mergelab bench build --zoo {Path(root)}`)")
    return read_json(path, "zoo manifest")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``root/manifest.json`` atomically (a temporary file, then a rename)."""
    tmp = root / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)


def model_path(root: str | os.PathLike[str], name: str) -> Path:
    """Directory of a zoo model by manifest name, e.g. ``model_path(zoo, "seed0/lora/ocr")``."""
    return Path(root) / name


def expert_names(seed: int, kind: str, tasks: Sequence[str] = TASKS) -> list[str]:
    """Manifest names of one seed's experts of ``kind`` (``"full"`` or ``"lora"``), in task order."""
    if kind not in SETTINGS:
        raise ValueError(f"kind must be one of {SETTINGS}, got {kind!r}")
    return [f"seed{seed}/{kind}/{t}" for t in tasks]


# ------------------------------------------------------------------------------------------- training data


class ZooData:
    """Training sets generated and encoded on first use, shared by every model of every seed of one process."""

    def __init__(self, plan: ZooPlan, tasks: Sequence[str]) -> None:
        self.plan, self.tasks = plan, tuple(tasks)
        self._raw: dict[tuple[str, str], list[Any]] = {}
        self._enc: dict[tuple[str, str], Encoded] = {}
        self._labelled: dict[tuple[str, str], Encoded | None] = {}

    def raw(self, task: str, variant: str) -> list[Any]:
        """The ``plan.n_train`` training samples of (task, variant), generated with ``plan.data_seed``."""
        if (task, variant) not in self._raw:
            self._raw[(task, variant)] = generate(task, variant, "train", n=self.plan.n_train,
                                                  seed=self.plan.data_seed)
        return self._raw[(task, variant)]

    def corpus(self) -> list[str]:
        """The tokenizer's training text: every task's and variant's samples."""
        lines: list[str] = []
        for key in sorted((t, v) for t in self.tasks for v in VARIANTS):
            lines += modeling.corpus_lines(self.raw(*key))
        return lines

    def encoded(self, task: str, variant: str, processor: Any) -> Encoded:
        """The training samples of (task, variant), encoded."""
        if (task, variant) not in self._enc:
            self._enc[(task, variant)] = encode(self.raw(task, variant), processor)
        return self._enc[(task, variant)]

    def lexicon(self, processor: Any) -> Encoded:
        """``plan.n_train`` lexicon items over the answers of every task's generic and shifted training data."""
        if ("lexicon", "") not in self._enc:
            words = answer_words(s for t in self.tasks for v in VARIANTS for s in self.raw(t, v))
            self._enc[("lexicon", "")] = encode(lexicon_items(words, self.plan.n_train, self.plan.data_seed),
                                                processor)
        return self._enc[("lexicon", "")]

    def described(self, task: str, variant: str, processor: Any) -> Encoded:
        """The training samples of (task, variant) as text-only described items (:mod:`mergelab.bench.lexicon`)."""
        key = (f"described:{task}", variant)
        if key not in self._enc:
            self._enc[key] = encode(described_items(self.raw(task, variant)), processor)
        return self._enc[key]

    def base_labelled(self, task: str, base: Any, processor: Any) -> Encoded | None:
        """The first ``plan.replay_items`` generic prompts of ``task`` answered by ``base`` (greedy, special tokens
        kept; prompts it leaves unanswered dropped), or None when it answers none. Cached per task and base
        checkpoint (its ``name_or_path``), so the five experts of a seed label them once per process."""
        key = (task, getattr(base, "name_or_path", ""))
        if not key[1] or key not in self._labelled:  # a model with no checkpoint path is labelled every time
            prompts = self.raw(task, "generic")[: self.plan.replay_items]
            answers = greedy_answers(base, processor, prompts, max_new_tokens=24, keep_special=True)
            labelled = [replace(s, answer=a, answers=[a]) for s, a in zip(prompts, answers, strict=True) if a]
            self._labelled[key] = encode(labelled, processor) if labelled else None
        return self._labelled[key]

    def base_data(self, processor: Any) -> Encoded:
        """The base's training set: every task's generic variant (``plan.base_task_weights``), plus the lexicon
        and described items the plan mixes in."""
        plan, tasks = self.plan, self.tasks
        weights = dict(plan.base_task_weights)
        parts = [(self.encoded(t, "generic", processor), weights.get(t, 1.0)) for t in tasks]
        if plan.base_lexicon:
            parts.append((self.lexicon(processor), plan.base_lexicon))
        if plan.base_described:
            share = plan.base_described / (2 * len(tasks))
            parts += [(self.described(t, v, processor), share) for t in tasks for v in VARIANTS]
        return concat(parts)

    def mixture_data(self, processor: Any) -> Encoded:
        """The mixture model's training set: every task's shifted variant, in equal parts."""
        return concat([(self.encoded(t, "shifted", processor), 1.0) for t in self.tasks])


def expert_data(data: ZooData, task: str, replay: float, processor: Any, base: Any = None) -> Encoded:
    """An expert's training set: its task's shifted variant, plus ``replay`` of the samples drawn (in equal parts)
    from every task's generic variant, the data the base was trained on.

    With ``plan.replay_targets == "base"`` the replayed part is the first ``plan.replay_items`` generic prompts per
    task answered by ``base`` (greedy; prompts it leaves unanswered are dropped) instead of the data's answers.
    """
    own = data.encoded(task, "shifted", processor)
    if not replay:
        return own
    share = replay / len(data.tasks)
    if data.plan.replay_targets == "data":
        return concat([(own, 1.0 - replay)] + [(data.encoded(t, "generic", processor), share) for t in data.tasks])
    if base is None:
        raise ValueError("expert_data: replay_targets 'base' needs the base model")
    parts = [(own, 1.0 - replay)]
    for t in data.tasks:
        labelled = data.base_labelled(t, base, processor)
        if labelled is not None:  # concat's weight is per example: scale it so the part's total is ``share`` of own's
            parts.append((labelled, share * len(own) / len(labelled)))
    return concat(parts)
