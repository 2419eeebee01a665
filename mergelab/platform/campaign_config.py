"""Pydantic schema of a campaign YAML (``mergelab campaign CAMPAIGN.yaml`` / ``mergelab worker CAMPAIGN.yaml``).

Example (OptMerge over a benchmark zoo, searching around the paper's defaults: docs/methods.md)::

    name: optmerge-lora-001
    experts: {zoo: data/zoo, kind: lora}          # or: base: ckpt/base + experts: [{path: ..., name: vqa}, ...]
                                                    # or the omni experts: {omni_zoo: data/zoo, kind: lora}
    method: optmerge
    params: {variant: lora}                         # fixed hyperparameters
    search_space:
      rank_ratio: {type: float, low: 0.05, high: 0.5}
      steps: {type: int, low: 50, high: 400, step: 50}
      lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      lam: {type: float, low: 0.3, high: 1.5}
    coefficients: {low: 0.5, high: 1.5}             # one searched coefficient per expert ("coef.<expert>")
    sampler: {name: tpe, seed: 0}                   # tpe | cmaes | gp | random | grid | nsga2
    budget: {n_trials: 30}                          # and/or timeout_s (per process, like Optuna's timeout)
    pruning: {pruner: median}                       # none | median | hyperband | successive_halving
    objective: {metrics: [val/average]}             # multi-objective: [val/average, val/worst_task]
                                                    # one weighted mean: add weights: [2, 1] (val/weighted)
    eval: {tasks: [vqa, geometry, chart, ocr, grounding], batch_size: 32}
    registry: {name: optmerge-lora, register: top_k, top_k: 3}
    enqueue: [{lam: 0.7}]                           # start points after the defaults (trial 0 of a new study)

The search sees only the val split: an objective on any other split is refused at validation.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.bench.omni.tasks import CROSS_SETS as OMNI_CROSS_SETS
from mergelab.bench.tasks import TASKS
from mergelab.evaluators import TASKS as EVAL_TASKS
from mergelab.platform.merge_config import ExpertConfig, RecipeFields, one_line


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatDist(_Strict):
    """``trial.suggest_float(name, low, high, log=log, step=step)``."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatDist:
        if not self.low <= self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log=true needs low > 0 and no step")
        return self

    def grid(self) -> list[float]:
        """Grid values (needs ``step``)."""
        if self.step is None:
            raise ValueError("a grid sampler needs `step` (or a categorical) for float parameters")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(n)]


class IntDist(_Strict):
    """``trial.suggest_int(name, low, high, step=step, log=log)``."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> IntDist:
        if not self.low <= self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("log=true needs low > 0 and step 1")
        return self

    def grid(self) -> list[int]:
        """Grid values."""
        return list(range(self.low, self.high + 1, self.step))


class CategoricalDist(_Strict):
    """``trial.suggest_categorical(name, choices)``."""

    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)

    def grid(self) -> list[Any]:
        """Grid values."""
        return list(self.choices)


Distribution = Annotated[FloatDist | IntDist | CategoricalDist, Field(discriminator="type")]


class ZooRef(_Strict):
    """Experts taken from the offline benchmark's zoo (``<zoo>/manifest.json``)."""

    zoo: str
    kind: Literal["full", "lora"] = "full"
    seed: int = 0
    tasks: list[str] | None = None


class OmniZooRef(_Strict):
    """The omni benchmark's modality experts (``<omni_zoo>/omni/seed<seed>``, :mod:`mergelab.bench.omni.build`).

    ``kind: lora`` (the paper's setting) takes the experts' peft adapters (LoRA on the LLM, the connector in
    ``modules_to_save``), ``full`` their full fine-tunes; both on the whole base with ``policy: auto`` (the
    ``omni_thinker`` preset: every tower and connector taken from its one owner). A zoo not built yet is built
    by the campaign first (``quick``: the test-sized plan, :meth:`~mergelab.bench.omni.build.OmniPlan.quick`).
    """

    omni_zoo: str
    kind: Literal["lora", "full"] = "lora"
    seed: int = 0
    modalities: list[Literal["image", "audio", "video"]] | None = None
    quick: bool = False


class SamplerConfig(_Strict):
    """Optuna sampler: TPE by default (multivariate), CMA-ES, GP, random, grid, or NSGA-II (multi-objective)."""

    name: Literal["tpe", "cmaes", "gp", "random", "grid", "nsga2"] = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = Field(default_factory=dict)


class BudgetConfig(_Strict):
    """Trials for the whole study (shared by all workers) and/or wall seconds per process."""

    n_trials: int | None = Field(default=20, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> BudgetConfig:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("give n_trials and/or timeout_s")
        return self


class PruningConfig(_Strict):
    """Prune a trial after each evaluated task on its running val average (single objective only)."""

    pruner: Literal["none", "median", "hyperband", "successive_halving"] = "none"
    n_startup_trials: int = Field(default=3, ge=0)
    n_warmup_steps: int = Field(default=1, ge=0)


WEIGHTED = "val/weighted"
"""The one objective of a campaign whose ``objective.weights`` combine its metrics (logged on each trial's run)."""


class ObjectiveConfig(_Strict):
    """Metrics to optimise: ``val/average`` (default), ``val/worst_task``, ``val/normalized_average``,
    ``val/<task>`` or any ``val/...`` metric name; the search sees only the val split.

    Several metrics are several objectives (Optuna's multi-objective study), unless ``weights`` (one per metric,
    >= 0, not all 0) combine them into one: ``val/weighted``, the weighted mean ``sum(w_i * m_i) / sum(w_i)``
    (e.g. half the cross-modal sets, half the own tasks). ``directions`` then has one entry.
    """

    metrics: list[str] = Field(default_factory=lambda: ["val/average"], min_length=1)
    directions: list[Literal["maximize", "minimize"]] | None = None
    weights: list[float] | None = None

    @property
    def names(self) -> list[str]:
        """The study's objectives: the metrics, or :data:`WEIGHTED` alone when ``weights`` combine them."""
        return [WEIGHTED] if self.weights is not None else list(self.metrics)

    def values(self, metrics: Mapping[str, float]) -> list[float]:
        """The study's objective values (as :attr:`names`) from a trial's logged metrics.

        Raises:
            KeyError: a metric is missing or not finite.
        """
        got = []
        for m in self.metrics:
            if m not in metrics or not math.isfinite(metrics[m]):
                raise KeyError(m)
            got.append(float(metrics[m]))
        if self.weights is None:
            return got
        return [sum(w * v for w, v in zip(self.weights, got, strict=True)) / sum(self.weights)]

    @field_validator("metrics")
    @classmethod
    def _val_only(cls, v: list[str]) -> list[str]:
        for m in v:
            if not m.startswith("val/"):
                raise ValueError(
                    f"objective metric {m!r} is not on the val split: the search sees only val "
                    "(test metrics are computed for registered candidates and at promotion, never fed to the sampler)"
                )
        return v

    @model_validator(mode="after")
    def _dirs(self) -> ObjectiveConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.metrics):
                raise ValueError(f"{len(self.metrics)} objective metrics but {len(self.weights)} weights")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"objective weights must be finite, >= 0 and not all 0, got {self.weights}")
        if self.directions is None:
            self.directions = ["maximize"] * len(self.names)
        if len(self.directions) != len(self.names):
            what = "one weighted objective" if self.weights is not None else f"{len(self.metrics)} objective metrics"
            raise ValueError(f"{what} but {len(self.directions)} directions")
        return self


class EvalConfig(_Strict):
    """Evaluation tasks and evaluator options (val during the search; test for candidates/promotion)."""

    tasks: list[str] = Field(default_factory=lambda: list(TASKS), min_length=1)
    split: Literal["val"] = "val"
    data_root: str | None = None
    batch_size: int = Field(default=32, ge=1)
    limit: int | None = Field(default=None, ge=1)

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if v != "val":
            raise ValueError(f"eval split {v!r} refused: a campaign searches on val only")
        return v


class RegistryConfig(_Strict):
    """Which trials become model versions: ``all``, the ``top_k`` by the first objective, or the ``best``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    register_policy: Literal["all", "top_k", "best", "none"] = Field(default="top_k", alias="register")
    top_k: int = Field(default=3, ge=1)
    evaluate_test: bool = False  # promotion evaluates the whole test split; this adds it at registration too
    keep_unregistered_weights: bool = False


class TrackingConfig(_Strict):
    """Where to track (default: the embedded ``mlruns/`` store, or ``MLFLOW_TRACKING_URI`` /
    ``MERGELAB_OPTUNA_STORAGE``)."""

    root: str | None = None
    tracking_uri: str | None = None
    artifact_root: str | None = None
    optuna_storage: str | None = None
    experiment: str = "mergelab"
    heartbeat_interval: int = Field(default=30, ge=1)
    grace_period: int | None = Field(default=None, ge=1)


class CampaignConfig(RecipeFields):
    """A hyperparameter-search campaign over merges (one Optuna study, one MLflow parent run).

    The recipe template is :class:`~mergelab.platform.merge_config.RecipeFields` (base, experts, method, params,
    policy, device, dtypes, seed: a merge YAML's fields, spelled the same), except that ``experts`` may also be a
    zoo reference (the capability zoo's :class:`ZooRef` or the omni zoo's :class:`OmniZooRef`), in which case
    ``base`` defaults to the zoo's; every trial's recipe is the template with the
    trial's ``params`` and coefficients. The rest is the search.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str | None = None  # type: ignore[assignment]  # optional here: a zoo reference brings its base
    experts: list[ExpertConfig] | ZooRef | OmniZooRef  # type: ignore[assignment]  # or a zoo reference
    search_space: dict[str, Distribution] = Field(default_factory=dict)
    coefficients: FloatDist | None = None
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    study_name: str | None = None
    defaults_first: bool = Field(default=True, description="trial 0 of a new study is the method's defaults")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description="more start points for a new study, in Optuna's names (search-space keys, coef.<expert>); "
                    "missing ones take the method's defaults")

    @model_validator(mode="after")
    def _check(self) -> CampaignConfig:
        if isinstance(self.experts, list):
            if self.base is None:
                raise ValueError("`base` is required when `experts` is a list of paths")
            if not self.experts:
                raise ValueError("`experts` is empty")
        overlap = sorted(set(self.params) & set(self.search_space))
        if overlap:
            raise ValueError(f"parameter(s) {overlap} are both fixed in `params` and searched in `search_space`")
        bad = [k for k in self.search_space if k.startswith("coef.")]
        if bad:
            raise ValueError(f"search_space keys {bad}: use `coefficients:` for per-expert coefficients")
        for i, point in enumerate(self.enqueue):
            stray = sorted(k for k in point if k not in self.search_space
                           and not (k.startswith("coef.") and self.coefficients is not None))
            if stray:
                raise ValueError(f"enqueue[{i}]: {stray} are not searched (search_space keys or coef.<expert>)")
        if isinstance(self.experts, OmniZooRef) and "tasks" not in self.eval.model_fields_set:
            self.eval.tasks = list(OMNI_CROSS_SETS)  # val/average is then the cross-modal average
        for t in self.eval.tasks:
            if t not in EVAL_TASKS:
                raise ValueError(f"eval.tasks: unknown task {t!r}{did_you_mean(t, EVAL_TASKS)}; "
                                 f"known: {sorted(EVAL_TASKS)}")
        names = {"average", "worst_task", "normalized_average", *self.eval.tasks}
        for m in self.objective.metrics:
            head = m.removeprefix("val/").split("/")[0]
            if head not in names:
                raise ValueError(f"objective.metrics: unknown metric {m!r}"
                                 f"{did_you_mean(m, [f'val/{n}' for n in sorted(names)])}; the val metrics are "
                                 "val/average, val/worst_task, val/normalized_average, val/<task>[/<metric>] "
                                 "of eval.tasks")
        if len(self.objective.metrics) > 1 and self.pruning.pruner != "none":
            raise ValueError("pruning works with a single objective metric only (Optuna cannot prune "
                             "multi-objective trials; a weighted objective is not the running average it sees)")
        if self.sampler.name == "nsga2" and not self.multi_objective:
            raise ValueError("sampler nsga2 is for multi-objective campaigns; use tpe for one objective")
        if self.sampler.name == "cmaes" and self.multi_objective:
            raise ValueError("sampler cmaes supports a single objective only")
        if self.registry.name is None:
            self.registry.name = self.name
        if self.study_name is None:
            self.study_name = self.name
        return self

    @property
    def multi_objective(self) -> bool:
        """True when more than one objective is optimised (several metrics without ``weights``)."""
        return len(self.objective.names) > 1


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, else an empty string."""
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_campaign(path: str | os.PathLike[str]) -> CampaignConfig:
    """Read and validate a campaign YAML; relative paths in it are resolved against the YAML's directory.

    Raises:
        ValueError: one line naming the file and the offending field.
    """
    p = Path(path)
    try:
        text = p.read_text()
        raw = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{p}: cannot read campaign YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a campaign YAML must be a mapping")
    try:
        cfg = CampaignConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{p}: {one_line(e, text, CampaignConfig)}") from None
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: CampaignConfig, here: Path) -> CampaignConfig:
    def fix(s: str | None) -> str | None:
        if s is None or "://" in s or Path(s).is_absolute():
            return s
        return str((here / s).resolve())

    cfg.base = fix(cfg.base)
    if isinstance(cfg.experts, ZooRef):
        cfg.experts.zoo = fix(cfg.experts.zoo) or cfg.experts.zoo
    elif isinstance(cfg.experts, OmniZooRef):
        cfg.experts.omni_zoo = fix(cfg.experts.omni_zoo) or cfg.experts.omni_zoo
    else:
        for e in cfg.experts:
            e.path = fix(e.path) or e.path
    cfg.eval.data_root = fix(cfg.eval.data_root)
    cfg.tracking.root = fix(cfg.tracking.root)
    return cfg
