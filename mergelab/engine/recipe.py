"""The merge recipe: one frozen, validated description of a merge that every layer receives as one object.

A :class:`MergeRecipe` says *what* to merge (base, experts with their kind, names and coefficients), *how* (method,
its parameters, the tensor policy, output and compute dtypes, seed) and *where* to compute (device). It is built
once -- from YAML (:func:`mergelab.platform.merge_config.load_recipe`), from a campaign trial
(:meth:`mergelab.platform.campaign_config.CampaignConfig.recipe`) or from Python (:meth:`MergeRecipe.build`) --
validated once in its constructor, hashed once (:attr:`MergeRecipe.digest`, the merge's identity in MLflow and the
model registry), and handed as one object to the engine (:func:`mergelab.engine.run_merge`), the tracker and the
registry.

How a recipe becomes weights: ``recipe -> plan -> stream -> method -> writer -> report`` (docs/architecture.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mergelab._dtypes import parse_dtype
from mergelab._files import content_hash
from mergelab.engine.adapters import is_lora_dir
from mergelab.engine.io import MergeError
from mergelab.engine.policy import MergePolicy, check_policy
from mergelab.methods import METHODS
from mergelab.methods.base import MethodSpec, scale_of

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
LORA_MERGE_MODES = ("delta", "factors", "core")
"""Values of :attr:`MergeRecipe.lora_merge`."""


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: a full fine-tuned checkpoint directory or a PEFT LoRA adapter directory.

    Attributes:
        path: the directory.
        coefficient: per-expert weight, passed to the method config's ``coefficients`` field (None = 1).
        name: a display name (defaults to the directory name).
        kind: ``"full"`` or ``"lora"``; detected from the directory when not given.
    """

    path: str | Path
    coefficient: float | None = None
    name: str | None = None
    kind: str | None = None

    @classmethod
    def of(cls, e: ExpertSpec | Mapping[str, Any] | str | Path) -> ExpertSpec:
        """Normalise a path, a ``{"path", "coefficient", "name"}`` mapping or a spec; fill in name and kind."""
        if isinstance(e, Mapping):
            unknown = sorted(set(e) - {"path", "coefficient", "name", "kind"})
            if unknown:
                raise MergeError(f"experts: unknown field(s) {unknown} in {dict(e)}")
            if "path" not in e:
                raise MergeError(f"experts: an expert needs a path, got {dict(e)}")
            e = cls(e["path"], e.get("coefficient"), e.get("name"), e.get("kind"))
        elif not isinstance(e, ExpertSpec):
            e = cls(e)
        path = str(e.path)
        kind = e.kind or ("lora" if is_lora_dir(path) else "full")
        if kind not in ("full", "lora"):
            raise MergeError(f"experts: kind of {path} must be 'full' or 'lora', got {kind!r}")
        coef = None if e.coefficient is None else float(e.coefficient)
        return cls(path, coef, e.name or Path(path).name, kind)


def _frozen(v: Any) -> Any:
    """A read-only copy of JSON-like data (mappings become MappingProxyType, lists tuples)."""
    if isinstance(v, Mapping):
        return MappingProxyType({str(k): _frozen(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


def _plain(v: Any) -> Any:
    """The inverse of :func:`_frozen`: plain dicts and lists, for JSON, YAML and the engine's report."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, MergePolicy):
        return v.to_dict()
    return v


@dataclass(frozen=True)
class MergeRecipe:
    """A validated merge: the one object the engine, the tracker and the registry receive.

    Attributes:
        base: the base checkpoint directory (Hugging Face layout, safetensors).
        experts: the experts, each with path, name, coefficient and kind.
        method: a key of :data:`mergelab.methods.METHODS`.
        params: the method's parameters as given (missing ones take the config's defaults; see
            :attr:`hyperparameters` for the resolved set).
        policy: ``"auto"``, a preset name, ``{"preset", "rules", "default"}``, a list of rules, or a
            :class:`~mergelab.engine.policy.MergePolicy`.
        device: ``auto`` | ``cpu`` | ``cuda[:i]`` (not part of the identity).
        dtype: output dtype; None keeps each tensor's base dtype.
        compute_dtype: dtype of the task vectors and the math.
        seed: merge seed; each tensor gets a generator seeded from ``(seed, tensor name)``.
        shard_size: bound on each output shard's data size in bytes (not part of the identity).
        carry_unique: copy tensors that the base lacks and exactly one expert has (modality merging).
        output: ``"full"`` (a merged checkpoint) or ``"adapter"`` (every expert a LoRA adapter: the merge written as
            one PEFT LoRA adapter, :mod:`mergelab.engine.adapter_out`).
        adapter_rank: the output adapter's rank with ``output: adapter`` (None: the sum of the experts' ranks,
            exact for task arithmetic and weight averaging).
        lora_merge: how LoRA experts are merged: ``"delta"`` (their weight deltas ``scaling * B @ A`` go through
            the method) or ``"factors"`` (every expert a LoRA adapter with the same targets and rank: the raw
            ``lora_A`` and ``lora_B`` factors each go through the method, lambda per factor, and the output is
            ``base + scaling * B_m @ A_m``, as the official modality-merging script does;
            :mod:`mergelab.engine.factors`) or ``"core"`` (every expert a LoRA adapter, any targets and ranks: per
            adapted weight the experts' deltas are expressed in the orthonormal bases of their factors' spans,
            ``B_i A_i = U M_i V^T``, the method merges the small cores ``M_i`` and the update is ``U M V^T``,
            exact with ``output: adapter`` at rank ``R <= sum r_i``; :mod:`mergelab.engine.core_space`).

    Raises:
        MergeError: on construction, any invalid field (one line naming it).
    """

    base: str
    experts: tuple[ExpertSpec, ...]
    method: str | MethodSpec
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    policy: Any = "auto"
    device: str = "auto"
    dtype: str | None = None
    compute_dtype: str = "float32"
    seed: int = 0
    shard_size: int = 2_000_000_000
    carry_unique: bool = False
    output: str = "full"
    adapter_rank: int | None = None
    lora_merge: str = "delta"

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("base", str(self.base))
        set_("experts", tuple(ExpertSpec.of(e) for e in self.experts))
        set_("params", _frozen(dict(self.params or {})))
        set_("policy", self.policy if isinstance(self.policy, (str, MergePolicy)) else _frozen(self.policy))
        if not self.experts:
            raise MergeError("experts: at least one expert is required")
        if not isinstance(self.method, MethodSpec) and self.method not in METHODS:
            raise MergeError(f"method: unknown method {self.method!r}; known: {sorted(METHODS)}")
        if not _DEVICE.fullmatch(str(self.device)):
            raise MergeError(f"device: unknown device {self.device!r}; use auto, cpu or cuda[:i]")
        try:
            parse_dtype(self.dtype, "dtype")
            cdtype = parse_dtype(self.compute_dtype, "compute_dtype")
        except ValueError as e:
            raise MergeError(str(e)) from None
        if cdtype is None or not cdtype.is_floating_point:
            raise MergeError(f"compute_dtype: must be a floating dtype, got {self.compute_dtype!r}")
        if isinstance(self.shard_size, bool) or int(self.shard_size) <= 0:
            raise MergeError(f"shard_size: must be a positive number of bytes, got {self.shard_size!r}")
        if self.output not in ("full", "adapter"):
            raise MergeError(f"output: must be 'full' or 'adapter', got {self.output!r}")
        if self.output == "adapter":
            full = [e.name for e in self.experts if e.kind != "lora"]
            if full:
                raise MergeError(f"output: 'adapter' needs every expert to be a LoRA adapter; {full[0]} is not")
        if self.adapter_rank is not None and (self.output != "adapter" or isinstance(self.adapter_rank, bool)
                                              or int(self.adapter_rank) <= 0):
            raise MergeError(f"adapter_rank: a positive rank, with output: adapter only; got {self.adapter_rank!r}")
        if self.lora_merge not in LORA_MERGE_MODES:
            raise MergeError(f"lora_merge: must be one of {LORA_MERGE_MODES}, got {self.lora_merge!r}")
        if self.lora_merge != "delta":
            full = [e.name for e in self.experts if e.kind != "lora"]
            if full:
                raise MergeError(f"lora_merge: {self.lora_merge!r} needs every expert to be a LoRA adapter; "
                                 f"{full[0]} is not")
            if self.lora_merge == "factors" and isinstance(self.method, MethodSpec):
                raise MergeError("lora_merge: 'factors' needs a method of the registry, not a custom MethodSpec")
        try:
            check_policy(self.policy)
        except ValueError as e:
            raise MergeError(f"policy: {e}") from None
        set_("_config", method_config(self.method_name, self.spec, self.params,
                                      [e.coefficient for e in self.experts], self.seed))

    def __hash__(self) -> int:
        return hash((self.base, self.experts, self.method_name, json.dumps(_plain(self.params), sort_keys=True)))

    # ----------------------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        base: str | Path,
        experts: Sequence[ExpertSpec | Mapping[str, Any] | str | Path],
        method: str | MethodSpec,
        params: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> MergeRecipe:
        """A recipe from Python values (paths, dicts or :class:`ExpertSpec` for experts); see the attributes."""
        return cls(base=str(base), experts=tuple(experts), method=method, params=dict(params or {}), **options)

    def replace(self, **changes: Any) -> MergeRecipe:
        """A validated copy with some fields changed (e.g. a trial's ``params``)."""
        return replace(self, **changes)

    @property
    def spec(self) -> MethodSpec:
        """The method's table entry (or the custom :class:`MethodSpec` given as ``method``)."""
        return self.method if isinstance(self.method, MethodSpec) else METHODS[self.method]

    @property
    def method_name(self) -> str:
        """The method's name in the table (a custom spec: its function's name)."""
        return getattr(self.method.fn, "__name__", "custom") if isinstance(self.method, MethodSpec) else self.method

    @property
    def config(self) -> Any:
        """The method's config dataclass instance, built (and validated) once."""
        return self._config  # type: ignore[attr-defined]

    @property
    def lam(self) -> float:
        """The scale the engine applies to the merged task vector (``params.lam`` or 1)."""
        return scale_of(self.config)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Every field of the method's config, defaults included (tuples as lists)."""
        return config_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data: the YAML form (``mergelab merge`` reads it back)."""
        return {
            "base": self.base,
            "experts": [{"path": str(e.path), "name": e.name, "coefficient": e.coefficient, "kind": e.kind}
                        for e in self.experts],
            "method": self.method_name,
            "params": _plain(self.params),
            "policy": _plain(self.policy),
            "device": self.device,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "seed": self.seed,
            "shard_size": int(self.shard_size),
            "carry_unique": self.carry_unique,
            "output": self.output,
            "adapter_rank": self.adapter_rank,
            "lora_merge": self.lora_merge,
        }

    def identity(self) -> dict[str, Any]:
        """What makes two merges the same: inputs by content hash, the resolved hyperparameters, the policy,
        dtypes, seed, ``carry_unique`` and a non-default ``output`` or ``lora_merge``; not the device, the shard
        size, paths or display names."""
        return {
            "base": content_hash(self.base),
            "experts": [{"sha256": content_hash(e.path), "coefficient": e.coefficient} for e in self.experts],
            "method": self.method_name,
            "hyperparameters": self.hyperparameters,
            "policy": _plain(self.policy),
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "seed": int(self.seed),
            "carry_unique": bool(self.carry_unique),
            # only when not the default, so that full merges keep their digests
            **({"output": self.output, "adapter_rank": self.adapter_rank} if self.output != "full" else {}),
            **({"lora_merge": self.lora_merge} if self.lora_merge != "delta" else {}),
        }

    @functools.cached_property
    def digest(self) -> str:
        """The merge's identity: 20 hex digits of SHA-256 over :meth:`identity` (content hashes cached per file)."""
        raw = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(raw).hexdigest()[:20]


def method_config(
    name: str, spec: MethodSpec, params: Mapping[str, Any] | None, coefs: Sequence[float | None], seed: int = 0
) -> Any:
    """Build a method's config from parameters and per-expert coefficients.

    The merge ``seed`` fills a ``seed`` field the user left unset (DARE-TIES global draws its masks from
    ``(cfg.seed, tensor name)``, as statistics passes get no per-tensor generator).

    Raises:
        MergeError: naming the parameter or the coefficients.
    """
    params = _plain(dict(params or {}))
    field_names = {f.name for f in fields(spec.config_cls)} if is_dataclass(spec.config_cls) else set()
    if "seed" in field_names and "seed" not in params:
        params["seed"] = int(seed) % 2**63  # configs take non-negative seeds
    if any(c is not None for c in coefs):
        if "coefficients" not in field_names:
            raise MergeError(f"experts: per-expert coefficients given but method {name!r} has no 'coefficients'")
        if params.get("coefficients") is not None:
            raise MergeError("experts: coefficients given both per expert and in params.coefficients")
        params["coefficients"] = tuple(1.0 if c is None else float(c) for c in coefs)
    try:
        return spec.make_config(params)
    except (TypeError, ValueError) as e:
        raise MergeError(f"params ({name}): {str(e).splitlines()[0]}") from None


def config_dict(cfg: Any) -> dict[str, Any]:
    """A method config as a plain dict (tuples as lists)."""
    if is_dataclass(cfg):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    return {}
