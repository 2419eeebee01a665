"""The merge recipe YAML: pydantic checks its structure at the boundary, :class:`MergeRecipe` its meaning.

Example::

    base: ckpt/base
    experts:
      - path: ckpt/vqa
      - {path: lora/ocr, coefficient: 0.7, name: ocr}
    method: ties
    params: {density: 0.2, lam: 1.0}
    policy: qwen2_vl            # or auto, or {preset: llama, rules: [{pattern: "mlp1\\..*", action: average}]}
                                # (actions: base, merge, average, owner)
    lora_merge: delta           # LoRA experts: delta (scaling * B @ A through the method), factors (A and B
                                # merged separately, as the official modality script) or core (the method merges
                                # the deltas' cores in the span of the factors; exact adapter output); the last
                                # two need every expert to be a LoRA adapter
    output: full                # or adapter: every expert a LoRA adapter -> one PEFT adapter (adapter_rank: r)
    device: auto                # auto | cpu | cuda[:i]
    dtype: null                 # output dtype; null keeps the base's
    compute_dtype: float32
    seed: 0
    shard_size: 2GB

Relative paths are resolved against the YAML file's directory. A mergekit configuration (``merge_method``,
``base_model``, ``models[].parameters``) is accepted as well and translated by
:func:`mergelab.platform.mergekit_yaml.from_mergekit`. :func:`load_recipe` turns the file into a
:class:`~mergelab.engine.recipe.MergeRecipe`, whose method parameters are validated by the method's own config
dataclass, so ``density: 1.5`` fails here, before any tensor is read. Every error is one line naming the file and
the field (``recipe.yaml: experts.1.path: ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from mergelab.engine import ExpertSpec, MergeError, MergeRecipe
from mergelab.platform.mergekit_yaml import from_mergekit, is_mergekit


class MergeConfigError(MergeError):
    """A merge recipe that does not validate; the message names the file and the field."""


class ExpertConfig(BaseModel):
    """One expert: a full checkpoint or a PEFT LoRA adapter directory."""

    model_config = ConfigDict(extra="forbid")
    path: str
    coefficient: float | None = None
    name: str | None = None
    score: float | None = Field(default=None, description="own-task val score (a campaign's val/normalized_average)")


class RuleConfig(BaseModel):
    """One policy rule: anchored regex and action."""

    model_config = ConfigDict(extra="forbid")
    pattern: str
    action: Literal["base", "merge", "average", "owner"]

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r} ({e})") from None
        return v


class PolicyConfig(BaseModel):
    """A preset plus explicit rules tried before it (or rules alone)."""

    model_config = ConfigDict(extra="forbid")
    preset: str | None = None
    rules: list[RuleConfig] = Field(default_factory=list)
    default: Literal["base", "merge", "average"] = "merge"



_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(v: int | str) -> int:
    """``2000000000``, ``"2GB"``, ``"500MiB"`` -> bytes (decimal for KB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(v, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(v, int):
        n = v
    else:
        m = _SIZE.match(str(v))
        if not m:
            raise ValueError(f"cannot parse size {v!r} (e.g. 2GB, 500MiB, 1000000)")
        unit = (m.group(2) or "b").lower()
        base = 1024 if "i" in unit else 1000
        power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
        n = int(float(m.group(1)) * base**power)
    if n <= 0:
        raise ValueError(f"size must be positive, got {v!r}")
    return n


def _policy_kind(v: Any) -> str:
    if isinstance(v, dict) or isinstance(v, PolicyConfig):
        return "<mapping>"
    if isinstance(v, list):
        return "<list>"
    return "<str>"


PolicyField = Annotated[
    Annotated[str, Tag("<str>")] | Annotated[PolicyConfig, Tag("<mapping>")] | Annotated[list[RuleConfig], Tag("<list>")],
    Discriminator(_policy_kind),
]


class RecipeFields(BaseModel):
    """The recipe's fields as YAML spells them: :class:`MergeConfig` is exactly this, a campaign's recipe template
    (:class:`~mergelab.platform.campaign_config.CampaignConfig`) inherits them. Structure is checked here (types,
    unknown keys, policy rules, sizes); meaning once, by :class:`~mergelab.engine.recipe.MergeRecipe`."""

    model_config = ConfigDict(extra="forbid")
    base: str
    experts: list[ExpertConfig] = Field(min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    policy: PolicyField = "auto"
    device: str = "auto"
    dtype: str | None = None
    compute_dtype: str = "float32"
    seed: int = 0
    shard_size: int | str = 2_000_000_000
    carry_unique: bool = False
    output: Literal["full", "adapter"] = "full"
    adapter_rank: int | None = None
    lora_merge: Literal["delta", "factors", "core"] = "delta"

    @field_validator("experts", mode="before")
    @classmethod
    def _plain_paths(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"path": e} if isinstance(e, str) else e for e in v]
        return v

    @field_validator("shard_size")
    @classmethod
    def _shard(cls, v: int | str) -> int:
        return parse_size(v)

    def policy_arg(self) -> Any:
        """The policy in the form :func:`mergelab.engine.policy.resolve_policy` accepts."""
        if isinstance(self.policy, str):
            return self.policy
        if isinstance(self.policy, list):
            return [r.model_dump() for r in self.policy]
        return self.policy.model_dump()

    def to_recipe(self, source: str = "config", **changes: Any) -> MergeRecipe:
        """The validated :class:`MergeRecipe` (``changes`` replace fields, e.g. a trial's ``params``).

        Raises:
            MergeConfigError: a field that does not validate, as ``<source>: <field>: <why>``.
        """
        experts = changes.pop("experts", None)
        if experts is None:
            experts = [ExpertSpec(e.path, e.coefficient, e.name) for e in self.experts]
        # every recipe field spelled the same here; the three that need converting, then the caller's changes
        fields: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(MergeRecipe)}
        fields.update(experts=experts, params=dict(self.params), policy=self.policy_arg(),
                      shard_size=int(self.shard_size))
        fields.update(changes)
        try:
            return MergeRecipe(**fields)
        except MergeError as e:
            raise MergeConfigError(f"{source}: {e}") from None


class MergeConfig(RecipeFields):
    """A merge recipe YAML (``mergelab merge CONFIG``)."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        """Load a YAML recipe and check its structure; relative paths are resolved against the file's directory.

        Raises:
            MergeConfigError: unreadable YAML or a field that does not validate (one line naming it).
        """
        path = Path(path)
        try:
            text = path.read_text()
            data = yaml.safe_load(text)
        except FileNotFoundError:
            raise MergeConfigError(f"{path}: file not found") from None
        except yaml.YAMLError as e:
            raise MergeConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MergeConfigError(f"{path}: expected a mapping at the top level")
        root = path.parent.absolute()
        if is_mergekit(data):  # mergekit's YAML (merge_method, base_model, models[].parameters)
            try:
                data = from_mergekit(data, root)
            except MergeError as e:
                raise MergeConfigError(f"{path}: {e}") from None
        cfg = cls.from_dict(data, source=str(path), text=text)
        cfg.base = str(_rel(root, cfg.base))
        for e in cfg.experts:
            e.path = str(_rel(root, e.path))
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", text: str | None = None) -> MergeConfig:
        """Validate a dict, turning pydantic's report into one line naming the first bad field (and its line in the
        YAML ``text``)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise MergeConfigError(f"{source}: {one_line(e, text, cls)}") from None


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read a merge YAML into a validated :class:`MergeRecipe` (paths relative to the file).

    Raises:
        MergeConfigError: one line naming the file and the field.
    """
    return MergeConfig.from_yaml(path).to_recipe(str(path))


def one_line(e: ValidationError, text: str | None = None, model: type[BaseModel] | None = None) -> str:
    """Pydantic's report as one line: ``<field path>: <message>`` of the first error, ``(+N more)``.

    With the YAML ``text`` the line is named (``... (line 7)``); an unknown key is named as such, with the closest
    known field of ``model`` ("did you mean ...").
    """
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("<"))
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden" and err["loc"]:
        key = str(err["loc"][-1])
        msg = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, sorted(field_names(model)), n=1) if model is not None else []
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    where = f"{loc}: " if loc else ""  # cross-field errors already start with their field name
    line = yaml_line(text, err["loc"]) if text is not None else None
    return f"{where}{msg}{more}{'' if line is None else f' (line {line})'}"


def field_names(model: type[BaseModel] | None) -> set[str]:
    """Every field name (and alias) of a pydantic model and of the models nested in it."""
    out: set[str] = set()
    todo, seen = [model], set()
    while todo:
        m = todo.pop()
        if m is None or m in seen or not (isinstance(m, type) and issubclass(m, BaseModel)):
            continue
        seen.add(m)
        for name, f in m.model_fields.items():
            out.add(name)
            if f.alias:
                out.add(f.alias)
            todo += [a for a in _types_in(f.annotation)]
    return out


def _types_in(t: Any) -> list[Any]:
    args = getattr(t, "__args__", None) or ()
    return [t, *(x for a in args for x in _types_in(a))]


def yaml_line(text: str, loc: Sequence[Any]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (the deepest one found), else None."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if hit is not None:
                line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
    return line


def _rel(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q
