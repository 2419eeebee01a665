"""The offline benchmark's model zoo: a base, five full fine-tuning and five LoRA experts, and a mixture model.

Stands in for the OptMerge paper's checkpoints (arXiv:2505.19892, spec section 3.1: InternVL2.5-1B full-FT experts,
Qwen2-VL-7B LoRA experts, a mixture-trained reference) with tiny Qwen2-VL models trained on the procedural tasks
of :mod:`mergelab.bench.tasks`, following the design the pilots found to behave like the paper
(spec/benchmark-pilot.md):

* the **base** is trained from scratch on the ``generic`` variants of all five tasks (the stand-in for a pretrained
  generalist MLLM);
* each **expert** fine-tunes the base, briefly and at a small learning rate (spec section 7), on the ``shifted``
  variant of one task (new answer words), once with full fine-tuning of the language model and once with LoRA on
  its linear layers;
* the **mixture** model fine-tunes the base on all five shifted training sets together with the experts' combined
  step budget (the "mixture training" reference row).

Layout under the zoo root (each model directory is a normal checkpoint that :func:`mergelab.hf.load_model` reads;
a LoRA directory is a peft adapter whose ``base_model_name_or_path`` is ``../../base``)::

    manifest.json
    seed0/base/  seed0/full/<task>/  seed0/lora/<task>/  seed0/mixture/
    seed1/...

``manifest.json`` records the plan, and per model its kind, task, seed, training config, train seconds, the SHA-256
of its weights file, a fingerprint of everything it was built from, and its per-task test scores on both variants
(through :func:`mergelab.evaluators.evaluate`). :func:`build_zoo` is idempotent: a model whose directory, weights
hash and fingerprint match the manifest is reused, anything else is (re)built; the manifest is rewritten atomically
after every model, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergelab._files import read_json
from mergelab.bench import modeling
from mergelab.bench.data import sha256_file
from mergelab.bench.modeling import TinyQwen2VLConfig
from mergelab.bench.train import DECODER_LAYERS, LANGUAGE_MODEL, Encoded, TrainConfig, concat, encode, train
from mergelab.hf import load_model, replace_dir, resolve_device, save_model

TASKS: tuple[str, ...] = ("vqa", "geometry", "chart", "ocr", "grounding")
KINDS: tuple[str, ...] = ("full", "lora", "mixture")
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


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_file(model_dir: Path) -> Path:
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


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)


def model_path(root: str | os.PathLike[str], name: str) -> Path:
    """Directory of a zoo model by manifest name, e.g. ``model_path(zoo, "seed0/lora/ocr")``."""
    return Path(root) / name


def expert_names(seed: int, kind: str, tasks: Sequence[str] = TASKS) -> list[str]:
    """Manifest names of one seed's experts of ``kind`` (``"full"`` or ``"lora"``), in task order."""
    if kind not in ("full", "lora"):
        raise ValueError(f"kind must be 'full' or 'lora', got {kind!r}")
    return [f"seed{seed}/{kind}/{t}" for t in tasks]


# ----------------------------------------------------------------------------------------------------- data


def _samples(task: str, variant: str, split: str, n: int | None, seed: int) -> list[Any]:
    from mergelab.bench.tasks import generate

    return generate(task, variant, split, n=n, seed=seed)


class _Data:
    """Training sets generated and encoded on first use, shared by every model of every seed of one process."""

    def __init__(self, plan: ZooPlan, tasks: Sequence[str]) -> None:
        self.plan, self.tasks = plan, tuple(tasks)
        self._raw: dict[tuple[str, str], list[Any]] = {}
        self._enc: dict[tuple[str, str], Encoded] = {}
        self._labelled: dict[tuple[str, str], Encoded | None] = {}

    def raw(self, task: str, variant: str) -> list[Any]:
        if (task, variant) not in self._raw:
            self._raw[(task, variant)] = _samples(task, variant, "train", self.plan.n_train, self.plan.data_seed)
        return self._raw[(task, variant)]

    def corpus(self) -> list[str]:
        lines: list[str] = []
        for key in sorted((t, v) for t in self.tasks for v in ("generic", "shifted")):
            lines += modeling.corpus_lines(self.raw(*key))
        return lines

    def encoded(self, task: str, variant: str, processor: Any) -> Encoded:
        if (task, variant) not in self._enc:
            self._enc[(task, variant)] = encode(self.raw(task, variant), processor)
        return self._enc[(task, variant)]

    def lexicon(self, processor: Any) -> Encoded:
        """``plan.n_train`` lexicon items over the answers of every task's generic and shifted training data."""
        from mergelab.bench.lexicon import answer_words, lexicon_items

        if ("lexicon", "") not in self._enc:
            words = answer_words(s for t in self.tasks for v in ("generic", "shifted") for s in self.raw(t, v))
            self._enc[("lexicon", "")] = encode(lexicon_items(words, self.plan.n_train, self.plan.data_seed),
                                                processor)
        return self._enc[("lexicon", "")]

    def described(self, task: str, variant: str, processor: Any) -> Encoded:
        """The training samples of (task, variant) as text-only described items (:mod:`mergelab.bench.lexicon`)."""
        from mergelab.bench.lexicon import described_items

        key = (f"described:{task}", variant)
        if key not in self._enc:
            self._enc[key] = encode(described_items(self.raw(task, variant)), processor)
        return self._enc[key]

    def base_labelled(self, task: str, base: Any, processor: Any) -> Encoded | None:
        """The first ``plan.replay_items`` generic prompts of ``task`` answered by ``base`` (greedy, special tokens
        kept; prompts it leaves unanswered dropped), or None when it answers none. Cached per task and base
        checkpoint (its ``name_or_path``), so the five experts of a seed label them once per process."""
        from mergelab.bench.train import greedy_answers

        key = (task, getattr(base, "name_or_path", ""))
        if not key[1] or key not in self._labelled:  # a model with no checkpoint path is labelled every time
            prompts = self.raw(task, "generic")[: self.plan.replay_items]
            answers = greedy_answers(base, processor, prompts, max_new_tokens=24, keep_special=True)
            labelled = [replace(s, answer=a, answers=[a]) for s, a in zip(prompts, answers, strict=True) if a]
            self._labelled[key] = encode(labelled, processor) if labelled else None
        return self._labelled[key]


def expert_data(data: _Data, task: str, replay: float, processor: Any, base: Any = None) -> Encoded:
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


# ----------------------------------------------------------------------------------------------- scoring


def score_model(model: Any, processor: Any, *, tasks: Sequence[str] = TASKS, variants: Iterable[str] = ("shifted",
                "generic"), split: str = "test", limit: int | None = None, data_root: str | os.PathLike[str] |
                None = None, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per-task scores (percent) of a model on each variant, through :func:`mergelab.evaluators.evaluate`.

    Returns:
        ``{variant: {task: score, ..., "average": mean}}``.
    """
    from mergelab.evaluators import evaluate

    out: dict[str, dict[str, float]] = {}
    for variant in variants:
        res = evaluate(model, processor, tasks=[_task_id(t, variant) for t in tasks], split=split,
                       data_root=data_root, limit=limit, batch_size=batch_size)
        scores = {t: round(float(res.scores[_task_id(t, variant)]), 2) for t in tasks}
        out[variant] = {**scores, "average": round(sum(scores.values()) / len(scores), 2)}
    return out


def _task_id(task: str, variant: str) -> str:
    """The evaluator task name of a benchmark task variant (the shifted variant is the benchmark's own)."""
    return task if variant == "shifted" else f"{task}_{variant}"


# ------------------------------------------------------------------------------------------------- build


@dataclass
class _Ctx:
    root: Path
    plan: ZooPlan
    manifest: dict[str, Any]
    data: _Data
    progress: bool
    device: str
    evaluate: bool
    data_root: Path | None
    log: Callable[[str], None]
    kinds: tuple[str, ...] = KINDS
    only: frozenset[str] | None = None
    jobs: int = 1
    built: list[str] = field(default_factory=list)


def _valid(ctx: _Ctx, name: str, fingerprint: str) -> bool:
    """Whether ``name`` is up to date (directory, weights hash, fingerprint); if so, score it when unscored."""
    entry = ctx.manifest["models"].get(name)
    d = ctx.root / name
    if not entry or entry.get("fingerprint") != fingerprint or not d.is_dir():
        return False
    try:
        wf = _weights_file(d)
    except FileNotFoundError:
        return False
    if entry.get("weights", {}).get(wf.name) != sha256_file(wf):
        return False
    ctx.log(f"{name}: reused")
    if ctx.evaluate and (not entry.get("scores") or entry.get("scores_limit") != ctx.plan.n_eval):
        model, processor = load_model(d, device="cpu")
        _score_into(ctx, name, entry, model, processor)
        _write_manifest(ctx.root, ctx.manifest)
    return True


def _score_into(ctx: _Ctx, name: str, entry: dict[str, Any], model: Any, processor: Any) -> None:
    t0 = time.perf_counter()
    entry["scores"] = score_model(model, processor, limit=ctx.plan.n_eval, data_root=ctx.data_root)
    entry["scores_limit"] = ctx.plan.n_eval
    entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
    ctx.log(_score_line(name, entry))


def _score_line(name: str, entry: dict[str, Any]) -> str:
    sh = entry.get("scores", {}).get("shifted")
    if not sh:
        return f"{name}: built"
    return f"{name}: shifted avg {sh['average']:.1f} " + " ".join(f"{t} {sh[t]:.1f}" for t in TASKS if t in sh)


def _bar(ctx: _Ctx, name: str, steps: int) -> tuple[Callable[[int, float], None] | None, Any]:
    if not ctx.progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=name, unit="step", leave=True, dynamic_ncols=True)

    def cb(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    return cb, bar


def _finish(ctx: _Ctx, name: str, entry: dict[str, Any], model: Any, processor: Any) -> dict[str, Any]:
    """Hash the saved weights and score the model into ``entry`` (no manifest write: a worker returns it)."""
    wf = _weights_file(ctx.root / name)
    entry["weights"] = {wf.name: sha256_file(wf)}
    entry["weights_bytes"] = wf.stat().st_size
    if ctx.evaluate:
        _score_into(ctx, name, entry, model, processor)
    return entry


def _insert(ctx: _Ctx, name: str, entry: dict[str, Any]) -> None:
    ctx.manifest["models"][name] = entry
    _write_manifest(ctx.root, ctx.manifest)
    ctx.built.append(name)


def _record(ctx: _Ctx, name: str, entry: dict[str, Any], model: Any, processor: Any) -> None:
    _insert(ctx, name, _finish(ctx, name, entry, model, processor))


def _train_and_save(ctx: _Ctx, name: str, model: Any, processor: Any, data: Encoded, cfg: TrainConfig,
                    entry: dict[str, Any], save: Callable[[Any, Path], None]) -> Any:
    cb, bar = _bar(ctx, name, cfg.steps)
    try:
        res = train(model, processor, data, cfg, device=ctx.device, progress=cb)
    finally:
        if bar is not None:
            bar.close()
    model = res.model.to("cpu")
    save(model, ctx.root / name)
    entry.update(train=cfg.to_dict(), train_seconds=round(res.seconds, 1), trainable_params=res.trainable_params,
                 final_loss=round(sum(res.losses[-10:]) / len(res.losses[-10:]), 4),
                 trained_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return model


def _save_full(processor: Any) -> Callable[[Any, Path], None]:
    def save(model: Any, path: Path) -> None:
        save_model(model, processor, path, overwrite=True)

    return save


def _save_lora(model: Any, path: Path) -> None:
    """Save a peft adapter atomically, pointing at the seed's base as ``../../base``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.peft_config["default"].base_model_name_or_path = "../../base"
        model.get_base_model().config._name_or_path = "../../base"  # peft's model card reads it
        model.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class _Job:
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


def _seed_jobs(ctx: _Ctx, seed: int, base_sha: str) -> list[_Job]:
    """The seed's experts and mixture this build asks for (kinds / only), up to date or not."""
    plan, tasks = ctx.plan, ctx.data.tasks
    jobs: list[_Job] = []
    for kind, cfg0 in (("full", plan.full), ("lora", plan.lora)):
        if kind not in ctx.kinds:
            continue
        for task in tasks:
            cfg = replace(cfg0, seed=seed * 1000 + TASKS.index(task) if task in TASKS else seed)
            parts: tuple[Any, ...] = (kind, base_sha, cfg.to_dict(), task, plan.n_train, plan.data_seed)
            replay = plan.replay(kind)
            if replay:  # omitted when off, so the fingerprints of zoos built before replay hold
                parts += ({"replay": replay, "tasks": list(tasks)},)
                if plan.replay_targets != "data":
                    parts += ({"replay_targets": plan.replay_targets, "replay_items": plan.replay_items},)
            jobs.append(_Job(f"seed{seed}/{kind}/{task}", kind, task, seed, cfg, _fingerprint(*parts)))
    if "mixture" in ctx.kinds:
        cfg = replace(plan.full, seed=seed * 1000 + 999, steps=plan.full.steps * plan.mixture_steps_factor)
        fp = _fingerprint("mixture", base_sha, cfg.to_dict(), tasks, plan.n_train, plan.data_seed)
        jobs.append(_Job(f"seed{seed}/mixture", "mixture", None, seed, cfg, fp))
    return [j for j in jobs if ctx.only is None or j.name in ctx.only]


def _run_job(ctx: _Ctx, job: _Job, processor: Any) -> dict[str, Any]:
    """Train ``job`` from its seed's saved base, save it under the zoo root, and return its manifest entry."""
    base_name = f"seed{job.seed}/base"
    entry = {"kind": job.kind, "task": job.task, "seed": job.seed, "variant": "shifted", "base": base_name,
             "fingerprint": job.fingerprint}
    base = load_model(ctx.root / base_name, device="cpu")[0]
    if job.task is None:
        data = concat([(ctx.data.encoded(t, "shifted", processor), 1.0) for t in ctx.data.tasks])
    else:  # after loading the base: with replay_targets "base" it labels the replayed prompts
        data = expert_data(ctx.data, job.task, ctx.plan.replay(job.kind), processor, base=base)
    save = _save_lora if job.kind == "lora" else _save_full(processor)
    model = _train_and_save(ctx, job.name, base, processor, data, job.cfg, entry, save)
    if job.kind == "lora":
        entry["lora_base"] = "../../base"
        model = model.merge_and_unload()
    return _finish(ctx, job.name, entry, model, processor)


def _build_seed(ctx: _Ctx, seed: int, processor: Any, tok_fp: str) -> None:
    plan, tasks = ctx.plan, ctx.data.tasks
    base_name = f"seed{seed}/base"
    base_cfg = replace(plan.base, seed=seed)
    weights = dict(plan.base_task_weights)
    fp_parts: tuple[Any, ...] = ("base", tok_fp, plan.size.to_dict(), base_cfg.to_dict(), weights, plan.n_train,
                                 plan.data_seed, tasks)
    if plan.base_lexicon or plan.base_described:  # omitted when off: the fingerprints of earlier zoos hold
        from mergelab.bench.lexicon import LEXICON_VERSION

        text = {"lexicon": plan.base_lexicon, "described": plan.base_described}
        fp_parts += ({**{k: v for k, v in text.items() if v}, "version": LEXICON_VERSION},)
    base_fp = _fingerprint(*fp_parts)
    if not _valid(ctx, base_name, base_fp):
        model = modeling.build_model(processor.tokenizer, plan.size, seed=seed)
        parts = [(ctx.data.encoded(t, "generic", processor), weights.get(t, 1.0)) for t in tasks]
        if plan.base_lexicon:
            parts.append((ctx.data.lexicon(processor), plan.base_lexicon))
        if plan.base_described:
            share = plan.base_described / (2 * len(tasks))
            parts += [(ctx.data.described(t, v, processor), share) for t in tasks for v in ("generic", "shifted")]
        data = concat(parts)
        entry = {"kind": "base", "task": None, "seed": seed, "variant": "generic", "fingerprint": base_fp}
        model = _train_and_save(ctx, base_name, model, processor, data, base_cfg, entry, _save_full(processor))
        _record(ctx, base_name, entry, model, processor)
    base_sha = ctx.manifest["models"][base_name]["weights"]["model.safetensors"]
    todo = [j for j in _seed_jobs(ctx, seed, base_sha) if not _valid(ctx, j.name, j.fingerprint)]
    if ctx.jobs > 1 and len(todo) > 1:
        _run_parallel(ctx, todo)
        return
    for job in todo:
        _insert(ctx, job.name, _run_job(ctx, job, processor))


_WORKER: dict[str, Any] = {}
"""Per worker process: the training data and processor of the zoo it builds for (kept across its jobs)."""


def _load_processor(tok_dir: Path) -> Any:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = tok.chat_template or modeling.QWEN2_VL_CHAT_TEMPLATE
    return modeling.build_processor(tok)


def _worker_job(root: str, plan: ZooPlan, tasks: tuple[str, ...], job: _Job, device: str, evaluate: bool,
                data_root: str | None, threads: int) -> dict[str, Any]:
    """Run one job in a worker process (``build_zoo(jobs=N)``) and return its manifest entry."""
    torch.set_num_threads(threads)
    key = (root, json.dumps(plan.to_dict(), sort_keys=True), tasks)
    if _WORKER.get("key") != key:
        _WORKER.update(key=key, data=_Data(plan, tasks), processor=_load_processor(Path(root) / "tokenizer"))
    ctx = _Ctx(Path(root), plan, {"models": {}}, _WORKER["data"], False, device, evaluate,
               Path(data_root) if data_root else None, lambda _msg: None)
    return _run_job(ctx, job, _WORKER["processor"])


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Pool initializer: end this worker when the building process is gone.

    A worker blocks on the pool's queue, whose pipe it holds both ends of, so it never sees the parent die: a
    building process killed without cleanup (SIGKILL, the OOM killer; or SIGTERM outside the ``mergelab`` CLI,
    which raises it as an interrupt) otherwise leaves the workers training and then waiting forever. A daemon
    thread polls the parent pid and exits the worker when it changes (the worker's own outputs go through a
    temporary directory, so nothing half-written is left in place)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_parallel(ctx: _Ctx, todo: Sequence[_Job]) -> None:
    """Train ``todo`` in ``ctx.jobs`` spawned worker processes, longest first, sharing the CPU threads.

    Each worker trains from the saved base and writes its own model directory; this process alone writes the
    manifest, as each job completes (an interrupted build keeps what finished)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, torch.get_num_threads() // ctx.jobs)
    order = sorted(todo, key=lambda j: -j.cost)
    ctx.log(f"training {len(order)} models in {min(ctx.jobs, len(order))} processes x {threads} thread(s)")
    pool = ProcessPoolExecutor(max_workers=min(ctx.jobs, len(order)), mp_context=mp.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        pending = {pool.submit(_worker_job, str(ctx.root), ctx.plan, ctx.data.tasks, job, ctx.device, ctx.evaluate,
                               str(ctx.data_root) if ctx.data_root else None, threads): job for job in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                entry = fut.result()  # a failed job raises here; the rest are cancelled below
                _insert(ctx, job.name, entry)
                ctx.log(f"{_score_line(job.name, entry)} (trained in {entry['train_seconds']:.0f} s)")
    except BaseException:
        # A failed job, Ctrl-C or SIGTERM (raised by the CLI): stop the workers now rather than wait minutes for
        # the jobs they are training (their outputs go through temporary directories; the manifest keeps what
        # finished).
        _terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate_workers(pool: Any) -> None:
    """Terminate a ProcessPoolExecutor's workers (``terminate_workers`` from Python 3.14; before, its processes)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def build_zoo(
    root: str | os.PathLike[str] = DEFAULT_ZOO,
    rebuild: bool = False,
    tiny: bool = False,
    progress: bool = True,
    *,
    plan: ZooPlan | None = None,
    tasks: Sequence[str] = TASKS,
    seeds: Sequence[int] | None = None,
    kinds: Sequence[str] = KINDS,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    device: str = "auto",
    evaluate: bool = True,
    data_root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or complete) the model zoo under ``root`` and return its manifest.

    Args:
        root: the zoo directory (created if needed).
        rebuild: retrain every model even when the manifest says it is up to date.
        tiny: use :meth:`ZooPlan.tiny` (seconds; for tests) unless ``plan`` is given.
        progress: show a tqdm bar per training run.
        plan: an explicit plan (overrides ``tiny``).
        tasks: the tasks to build experts for (default all five).
        seeds: override the plan's seeds.
        kinds: which models to build besides each seed's base (subset of ``KINDS``); lets several processes
            build one zoo's parts in parallel (each in its own root, then :func:`combine_zoos`).
        only: build only these models (manifest names such as ``"seed0/full/ocr"``; the seed's base is always
            built or reused), for the same purpose.
        jobs: train each seed's experts and mixture in this many worker processes, splitting the torch threads
            among them (the base trains first, in this process); on a CPU, two 1-thread processes train about
            15% faster than one 2-thread process, and on a many-core machine ``jobs`` scales the build.
        device: training device (``"auto"``: CUDA when present).
        evaluate: score every model into the manifest (needs :mod:`mergelab.evaluators`).
        data_root: where the evaluators find the benchmark data (their default when None).
        log: a one-line logger (default: print when ``progress``).

    Returns:
        The manifest dictionary (also written to ``root/manifest.json``).
    """
    plan = plan or (ZooPlan.tiny() if tiny else ZooPlan())
    if seeds is not None:
        plan = replace(plan, seeds=tuple(seeds))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {TASKS}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; known: {KINDS}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    resolved = resolve_device(device)  # fails here, before anything is written, on a bad or missing device
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    log = log or (print if progress else (lambda _msg: None))
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        manifest = {}
    plan_dict = plan.to_dict()
    if rebuild or manifest.get("format") != FORMAT_VERSION:
        manifest = {}
    manifest.setdefault("format", FORMAT_VERSION)
    manifest.setdefault("models", {})
    manifest["tasks"] = list(tasks)
    manifest["plan"] = plan_dict
    manifest["image_size"] = modeling.IMAGE_SIZE
    build_env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(resolved)}

    t_start = time.perf_counter()
    data = _Data(plan, tasks)
    tok_fp = _fingerprint("tokenizer", plan.vocab_size, data.corpus())
    tok_dir = root / "tokenizer"
    if not rebuild and manifest.get("tokenizer", {}).get("fingerprint") == tok_fp and tok_dir.is_dir():
        processor = _load_processor(tok_dir)
    else:
        tok = modeling.build_tokenizer(data.corpus(), vocab_size=plan.vocab_size)
        tmp = root / f".tokenizer.tmp-{uuid.uuid4().hex[:8]}"
        tok.save_pretrained(tmp)
        replace_dir(tmp, tok_dir)
        manifest["models"] = {}  # a new tokenizer invalidates every model
        manifest["tokenizer"] = {"fingerprint": tok_fp, "vocab_size": len(tok), "path": "tokenizer"}
        _write_manifest(root, manifest)
        processor = modeling.build_processor(tok)
    if evaluate:
        from mergelab.bench.data import ensure_data

        data_root = ensure_data(data_root, tasks=tasks, splits=("val", "test"), seed=plan.data_seed)
    ctx = _Ctx(root, plan, manifest, data, progress, device, evaluate, Path(data_root) if data_root else None, log,
               tuple(kinds), frozenset(only) if only is not None else None, jobs)
    torch_threads = torch.get_num_threads()
    try:
        for seed in plan.seeds:
            _build_seed(ctx, seed, processor, tok_fp)
    finally:
        torch.set_num_threads(torch_threads)
    if ctx.built or "build_env" not in manifest:  # a run that reused everything leaves the build record alone
        manifest["build_env"] = build_env
        manifest["build_seconds_last"] = round(time.perf_counter() - t_start, 1)
    _write_manifest(root, manifest)
    return manifest


def combine_zoos(dest: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Move the models of zoos built in parallel (same plan and tokenizer) into ``dest`` and merge their manifests.

    A source contributes the models of the seeds its last build was for (its manifest's ``plan.seeds``): a source
    made by copying a zoo and building one seed in it carries stale copies of the other seeds, which stay out. Of
    two different models under one name, the one trained last (``trained_at``; entries without it count as
    oldest) is kept, so a stale copy of a model that ``dest`` retrained does not overwrite it either.

    Raises:
        ValueError: a source has another tokenizer or plan than ``dest`` (named in the message).
    """
    dest = Path(dest)
    manifest = read_manifest(dest)
    for src in map(Path, sources):
        other = read_manifest(src)
        for key in ("tokenizer", "plan"):
            if {k: v for k, v in other[key].items() if k != "seeds"} != \
                    {k: v for k, v in manifest[key].items() if k != "seeds"}:
                raise ValueError(f"{src / MANIFEST}: {key} differs from {dest / MANIFEST}; cannot combine")
        built_for = {int(x) for x in other["plan"]["seeds"]}
        for name, entry in other["models"].items():
            if int(entry["seed"]) not in built_for:
                continue
            mine = manifest["models"].get(name)
            if mine is not None and mine["weights"] == entry["weights"]:
                manifest["models"][name] = entry  # same weights; the source may have rescored them
                continue
            if mine is not None and entry.get("trained_at", "") < mine.get("trained_at", ""):
                continue  # dest's model is newer: the source holds a stale copy
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copytree(src / name, tmp)
            replace_dir(tmp, target)
            manifest["models"][name] = entry
        manifest["plan"]["seeds"] = sorted({*manifest["plan"]["seeds"], *other["plan"]["seeds"]})
    manifest["models"] = dict(sorted(manifest["models"].items()))
    _write_manifest(dest, manifest)
    return manifest


# --------------------------------------------------------------------------------------------- benchmark

LAM_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
"""The paper's lambda grid "for all methods" (spec section 1.7), searched on the val split."""


def method_params(method: str, setting: str) -> dict[str, Any]:
    """Each method's defaults, plus OptMerge's variant matching the expert setting (spec section 1.7)."""
    return {"variant": setting} if method == "optmerge" else {}


def has_lam(method: str, setting: str) -> bool:
    from mergelab.methods import METHODS

    return hasattr(METHODS[method].make_config(method_params(method, setting)), "lam")


class LamScan:
    """``theta0 + lam * tau_m`` for any lambda from one merge at lam = 1 (the engine's contract, methods/base.py)."""

    def __init__(self, base_dir: Path, merged_dir: Path) -> None:
        self.model, self.processor = load_model(merged_dir, device="cpu")
        base_model, _ = load_model(base_dir, device="cpu")
        base_sd = base_model.state_dict()
        self.base = {k: v.clone() for k, v in base_sd.items()}
        self.delta = {k: v.float() - base_sd[k].float() for k, v in self.model.state_dict().items()}

    def set(self, lam: float) -> Any:
        with torch.no_grad():
            for k, p in self.model.state_dict().items():
                p.copy_((self.base[k].float() + lam * self.delta[k]).to(p.dtype))
        return self.model


def _expert_dirs(root: Path, seed: int, setting: str, tasks: Sequence[str]) -> list[Path]:
    return [root / n for n in expert_names(seed, setting, tasks)]


def _cached_scores(entry: dict[str, Any], variants: Sequence[str]) -> dict[str, dict[str, float]] | None:
    scores = entry.get("scores")
    if scores and all(v in scores for v in variants):
        return {v: scores[v] for v in variants}
    return None


def benchmark(
    root: str | os.PathLike[str] = DEFAULT_ZOO,
    *,
    settings: Sequence[str] = ("full", "lora"),
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    lams: Sequence[float] = LAM_GRID,
    val_limit: int | None = 100,
    test_limit: int | None = None,
    data_root: str | os.PathLike[str] | None = None,
    data_sizes: dict[str, int] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    fixed_rows: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score base, experts, mixture and every merging method of the zoo on the test split, per seed and setting.

    Each method runs with its defaults (OptMerge with the variant of the setting); its lambda is chosen from
    ``lams`` by the average score on the **val** split (first ``val_limit`` items per task), then the chosen model
    is scored on the test split of both variants (shifted = the benchmark, generic = forgetting). Base, expert
    and mixture rows reuse the manifest's scores when they were taken with the same ``test_limit``
    (``fixed_rows=False`` leaves them out, to run methods in parallel processes). ``data_sizes`` (items per split,
    e.g. ``{"val": 8, "test": 8}``) generates smaller evaluation data, for smoke tests.

    Returns:
        ``{"rows": {setting: {row: {seed: {variant: {task: score, "average": ...}}}}}, "lam": {...},
        "timing": {...}}``.
    """
    import tempfile

    from mergelab.bench.data import ensure_data
    from mergelab.engine import merge
    from mergelab.methods import METHODS

    root = Path(root)
    manifest = read_manifest(root)
    data_root = ensure_data(data_root, tasks=manifest.get("tasks", TASKS), splits=("val", "test"),
                            seed=manifest["plan"].get("data_seed", 0), sizes=data_sizes)
    tasks = list(manifest.get("tasks", TASKS))
    seeds = list(seeds if seeds is not None else manifest["plan"]["seeds"])
    methods = list(METHODS) if methods is None else list(methods)
    variants = ("shifted", "generic")
    out: dict[str, Any] = {"tasks": tasks, "seeds": seeds, "limits": {"val": val_limit, "test": test_limit},
                           "rows": {}, "lam": {}, "timing": {}}
    work = Path(work_dir or tempfile.mkdtemp(prefix="mergelab-bench-"))

    def score(model: Any, processor: Any, split: str, limit: int | None, vs: Sequence[str]) -> dict:
        return score_model(model, processor, tasks=tasks, variants=vs, split=split, limit=limit, data_root=data_root)

    for setting in settings:
        rows: dict[str, dict[int, Any]] = {}
        out["lam"][setting] = {}
        for seed in seeds:
            base_dir = root / f"seed{seed}" / "base"
            fixed = [f"seed{seed}/base"] + expert_names(seed, setting, tasks) + [f"seed{seed}/mixture"]
            for name in fixed if fixed_rows else ():
                entry = manifest["models"].get(name)
                if entry is None and name.endswith("/mixture"):
                    log(f"{root / MANIFEST}: no {name}; the mixture row is left out")
                    continue
                if entry is None:
                    raise FileNotFoundError(f"{root / MANIFEST}: model {name!r} missing (run `mergelab bench build`)")
                label = name.split("/", 1)[1].replace(f"{setting}/", "expert:")
                cached = _cached_scores(entry, variants) if test_limit == entry.get("scores_limit", -1) else None
                if cached is None:
                    m, p = load_model(root / name, device="cpu")
                    cached = score(m, p, "test", test_limit, variants)
                rows.setdefault(label, {})[seed] = cached
            for method in methods:
                t0 = time.perf_counter()
                scan = has_lam(method, setting)
                params = {**method_params(method, setting), **({"lam": 1.0} if scan else {})}
                merged = work / f"{setting}-seed{seed}-{method}"
                merge(base=base_dir, experts=[str(d) for d in _expert_dirs(root, seed, setting, tasks)],
                      method=method, params=params, policy="qwen2_vl", out=merged, device="cpu", seed=seed,
                      overwrite=True)
                t_merge = time.perf_counter() - t0
                lam_scan = LamScan(base_dir, merged)
                best_lam, best_val = 1.0, -1.0
                for lam in (lams if scan else (1.0,)):
                    v = score(lam_scan.set(lam), lam_scan.processor, "val", val_limit, ("shifted",))
                    if v["shifted"]["average"] > best_val:
                        best_lam, best_val = lam, v["shifted"]["average"]
                t1 = time.perf_counter()
                model = lam_scan.set(best_lam)
                res = score(model, lam_scan.processor, "test", test_limit, ("shifted",))  # the five benchmark tasks
                t_eval = time.perf_counter() - t1
                res.update(score(model, lam_scan.processor, "test", test_limit, ("generic",)))  # forgetting
                t_generic = time.perf_counter() - t1 - t_eval
                rows.setdefault(f"merge:{method}", {})[seed] = res
                out["lam"][setting].setdefault(method, {})[seed] = best_lam
                out["timing"].setdefault(setting, {}).setdefault(method, {})[seed] = {
                    "merge_s": round(t_merge, 1), "eval_s": round(t_eval, 1), "generic_eval_s": round(t_generic, 1),
                    "total_s": round(time.perf_counter() - t0, 1)}
                shutil.rmtree(merged, ignore_errors=True)
                sh = rows[f"merge:{method}"][seed]["shifted"]
                log(f"{setting} seed{seed} {method}: lam {best_lam} (val {best_val:.1f}) test avg {sh['average']:.1f}"
                    f" [merge {t_merge:.1f}s]")
        out["rows"][setting] = rows
    return out


def combine_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join :func:`benchmark` results of disjoint (seed, setting) runs (e.g. one process each) into one result.

    Raises:
        ValueError: the runs disagree on the tasks or on the items scored (``limits``; results written before
            limits were recorded join anything), or two runs scored the same row of the same seed and setting.
    """
    if not results:
        raise ValueError("combine_results: no results")
    tasks = results[0]["tasks"]
    out: dict[str, Any] = {"tasks": tasks, "seeds": [], "rows": {}, "lam": {}, "timing": {}}
    for k, res in enumerate(results):
        if res["tasks"] != tasks:
            raise ValueError(f"result {k}: tasks {res['tasks']} differ from {tasks}")
        if "limits" in res:
            if out.setdefault("limits", res["limits"]) != res["limits"]:
                raise ValueError(f"result {k}: limits {res['limits']} differ from {out['limits']} (items per task; "
                                 "rows scored on different items do not average)")
        out["seeds"] = sorted({*out["seeds"], *(int(x) for x in res["seeds"])})
        for key in ("rows", "lam", "timing"):
            for setting, per_row in res.get(key, {}).items():
                dest = out[key].setdefault(setting, {})
                for row, per_seed in per_row.items():
                    cell = dest.setdefault(row, {})
                    for seed, value in per_seed.items():
                        if str(seed) in cell:
                            raise ValueError(f"result {k}: {key} {setting}/{row} seed {seed} appears twice")
                        cell[str(seed)] = value
    return out


def slowest_merge(result: dict[str, Any], setting: str) -> str | None:
    """The slowest merge plus its test evaluation of one setting, as a line for the report (None: no merges).

    The issue's cost target counts one merge and the evaluation of the five benchmark tasks (shifted variants); the
    generic variants, scored only for the forgetting table, are reported beside it. Results written before the two
    were timed apart give one time for both.
    """
    per = [(m, t) for m, per_seed in result.get("timing", {}).get(setting, {}).items() for t in per_seed.values()]
    if not per:
        return None
    items = result.get("limits", {}).get("test", "?")
    items = "all" if items is None else items
    both, m2 = max((t["merge_s"] + (t["eval_s"] + t["generic_eval_s"] if "eval_s" in t else t["test_eval_s"]), m)
                   for m, t in per)
    apart = [(t["merge_s"] + t["eval_s"], m) for m, t in per if "eval_s" in t]
    if not apart:
        return f"slowest merge + test evaluation (5 tasks, shifted + generic): {both:.1f} s ({m2})"
    worst, m = max(apart)
    of = "" if len(apart) == len(per) else f", of the {len(apart)} of {len(per)} runs timed apart"
    return (f"slowest merge + test evaluation of the five tasks ({items} items each{of}): {worst:.1f} s ({m}); "
            f"with the generic variants for the forgetting table: {both:.1f} s ({m2})")


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def aggregate(result: dict[str, Any], setting: str, variant: str = "shifted") -> dict[str, dict[str, tuple]]:
    """``{row: {column: (mean, sd over seeds)}}`` for one setting and variant."""
    cols = [*result["tasks"], "average"]
    agg: dict[str, dict[str, tuple]] = {}
    for row, per_seed in result["rows"][setting].items():
        agg[row] = {c: _mean_sd([per_seed[s][variant][c] for s in per_seed]) for c in cols}
    return agg


def format_table(result: dict[str, Any], setting: str, variant: str = "shifted") -> str:
    """A plain-text table: rows base / experts / mixture / merges, columns the tasks and the average."""
    cols = [*result["tasks"], "average"]
    agg = aggregate(result, setting, variant)
    n = len(result["seeds"])
    head = f"{'model':<36}" + "".join(f"{c:>15}" for c in cols)
    lines = [f"[{setting} experts, {variant} variant, test split, mean +- sd over {n} seed(s)]", head,
             "-" * len(head)]
    for row, vals in agg.items():
        lam = ""
        if row.startswith("merge:"):
            chosen = result["lam"][setting].get(row[6:], {})
            lam = " (lam " + "/".join(f"{chosen[s]:g}" for s in sorted(chosen)) + ")"
        lines.append(f"{(row + lam)[:36]:<36}" + "".join(f"{vals[c][0]:>9.1f} +-{vals[c][1]:>4.1f}" for c in cols))
    return "\n".join(lines)


def check_targets(result: dict[str, Any], setting: str) -> list[tuple[str, bool, str]]:
    """The issue's design targets on the mean over seeds: ``[(target, passed, detail)]``.

    Scores are multiples of 0.5 points averaged over seeds, so a target met exactly (a merge keeping 91 of 182
    points of a gain) lands a rounding error either side of its threshold; the comparisons allow for that.
    """
    eps = 1e-9
    agg = aggregate(result, setting)
    tasks = result["tasks"]
    base = {c: v[0] for c, v in agg["base"].items()} if "base" in agg else None
    if base is None:
        return []
    experts = {t: {c: v[0] for c, v in agg[f"expert:{t}"].items()} for t in tasks if f"expert:{t}" in agg}
    merges = {r[6:]: {c: v[0] for c, v in vals.items()} for r, vals in agg.items() if r.startswith("merge:")}
    out: list[tuple[str, bool, str]] = []
    gains = {t: experts[t][t] - base[t] for t in experts}
    out.append(("each expert beats the base on its own task by >= 10",
                all(g >= 10 - eps for g in gains.values()), " ".join(f"{t} {g:+.1f}" for t, g in gains.items())))
    if merges:
        best = max(merges, key=lambda m: merges[m]["average"])
        b = merges[best]
        best_expert = max(e["average"] for e in experts.values())
        out.append(("best merge beats the base average by >= 3", b["average"] - base["average"] >= 3 - eps,
                    f"{best} {b['average']:.1f} vs base {base['average']:.1f}"))
        out.append(("best merge beats every single expert's average", b["average"] > best_expert + eps,
                    f"{best} {b['average']:.1f} vs best expert {best_expert:.1f}"))
        kept = {t: (b[t] - base[t]) / gains[t] if gains[t] > 0 else 0.0 for t in gains}
        out.append(("best merge keeps >= half of the own-task gain on >= 3 of 5 tasks",
                    sum(k >= 0.5 - eps for k in kept.values()) >= 3,
                    " ".join(f"{t} {k:.0%}" for t, k in kept.items())))
        avgs = [m["average"] for m in merges.values()]
        out.append(("methods' averages spread over >= 5 points", max(avgs) - min(avgs) >= 5 - eps,
                    f"{min(avgs):.1f} .. {max(avgs):.1f}"))
    return out
