"""Merge policies: which tensors are kept at the base, merged by the method, or averaged (the paper's scripts).

The official OptMerge scripts exclude parameters with anchored regexes (``re.match``) and then treat the rest in two
classes: 2-D weights go to the method (WUDI, OptMerge, TSV, Iso-C), everything else is averaged. A
:class:`MergePolicy` is that, as data: an ordered list of :class:`Rule` (first match wins) mapping a tensor name to
an action:

* ``base``    -- excluded: the output keeps the base model's value (the scripts' exclusion list);
* ``merge``   -- handed to the method; for ``matrix_only`` methods only 2-D tensors without ``lm_head`` in the
  name, the rest of them averaged (exactly the scripts' split);
* ``average`` -- always ``lam * mean_i tau_i``, whatever the method;
* ``owner``   -- taken bit for bit from the one expert that changes it (an encoder or connector of modality
  merging; a LoRA expert's ``modules_to_save`` value), the base's value when no expert changes it, an error when
  two or more do.

Unmatched names get ``default`` (``merge``). Presets reproduce the paper's lists, one per model family of
:mod:`mergelab.families` (each family names the sub-models kept at the base under **both** naming schemes of
transformers 5, legacy 4.x names on disk and new names in memory, so that the same preset works on a checkpoint
saved by either version), followed by the LLM rules every preset shares. ``auto`` picks a preset from the base
config's ``model_type`` / ``architectures``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mergelab.families import FAMILIES, Family, family_for_config

ACTIONS = ("base", "merge", "average", "owner")

# The LLM part shared by every preset (Qwen script lines 653-659 minus the vision tower): token embeddings,
# lm_head, every norm and every bias stay at the base.
_LLM_EXCLUDE = (r".*embed_tokens.*", r".*lm_head.*", r".*norm.*", r".*bias.*")


@dataclass(frozen=True)
class Rule:
    """One policy rule: an anchored regex (``re.match``) and the action for names it matches."""

    pattern: str
    action: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"policy rule {self.pattern!r}: action must be one of {ACTIONS}, got {self.action!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"policy rule {self.pattern!r}: invalid regex ({e})") from None


@dataclass(frozen=True)
class MergePolicy:
    """An ordered rule list; the first rule whose pattern ``re.match``-es the tensor name decides."""

    name: str
    rules: tuple[Rule, ...] = ()
    default: str = "merge"
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.default not in ACTIONS:
            raise ValueError(f"policy {self.name!r}: default must be one of {ACTIONS}, got {self.default!r}")
        object.__setattr__(self, "_compiled", tuple((re.compile(r.pattern), r.action) for r in self.rules))

    def action(self, name: str) -> str:
        """The action for tensor ``name``: one of :data:`ACTIONS`."""
        for pat, act in self._compiled:
            if pat.match(name):
                return act
        return self.default

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "default": self.default, "rules": [[r.pattern, r.action] for r in self.rules]}


def preset_from_family(family: Family) -> MergePolicy:
    """A family's preset: its own rules (:meth:`Family.policy_rules`), then the LLM rules every preset shares."""
    rules = [Rule(p, a) for p, a in family.policy_rules()]
    rules += [Rule(p, "base") for p in _LLM_EXCLUDE]
    return MergePolicy(family.name, tuple(rules))


def presets_from(families: Iterable[Family]) -> Mapping[str, MergePolicy]:
    """``name -> preset`` of every family that has one, in the families' order."""
    return MappingProxyType({f.name: preset_from_family(f) for f in families if f.has_preset})


PRESETS: Mapping[str, MergePolicy] = presets_from(FAMILIES.values())
"""One preset per family of :data:`mergelab.families.FAMILIES` that has one, by family name (what each keeps at the
base, and why, is documented in its family's module)."""


def preset_for_config(config: Mapping[str, Any]) -> str:
    """Pick a preset name from a Hugging Face ``config.json`` (``model_type`` first, then ``architectures``).

    The family with a preset whose model types or architecture names match (:func:`mergelab.families.family_for_config`).

    Raises:
        ValueError: nothing matches (names the model type and the presets).
    """
    family = family_for_config(config, (FAMILIES[name] for name in PRESETS))
    if family is not None:
        return family.name
    raise ValueError(
        f"policy 'auto': no preset for model_type {str(config.get('model_type', ''))!r} / architectures "
        f"{config.get('architectures')}; "
        f"choose one of {sorted(PRESETS)} or give explicit rules"
    )


def resolve_policy(policy: str | MergePolicy | Mapping[str, Any] | Sequence[Any], config: Mapping[str, Any]) -> MergePolicy:
    """Normalise a policy given as a preset name, ``"auto"``, a :class:`MergePolicy`, a rule list or a mapping.

    Accepted forms: ``"qwen2_vl"``; ``"auto"``; ``[{"pattern": "visual\\..*", "action": "base"}, ...]`` or
    ``[["visual\\..*", "base"], ...]``; ``{"preset": "llama", "rules": [...], "default": "merge"}`` (explicit
    rules are tried before the preset's).

    Raises:
        ValueError: unknown preset or malformed rule (names the culprit).
    """
    if isinstance(policy, MergePolicy):
        return policy
    if isinstance(policy, str):
        name = preset_for_config(config) if policy == "auto" else policy
        if name not in PRESETS:
            raise ValueError(f"policy: unknown preset {policy!r}; known: {['auto', *sorted(PRESETS)]}")
        return PRESETS[name]
    if isinstance(policy, Mapping):
        extra = _rules(policy.get("rules") or [])
        preset = policy.get("preset")
        base = resolve_policy(preset, config) if preset else MergePolicy("rules")
        name = f"{base.name}+rules" if preset else "rules"
        return MergePolicy(name, extra + base.rules, policy.get("default", base.default))
    return MergePolicy("rules", _rules(policy))


def check_policy(policy: str | MergePolicy | Mapping[str, Any] | Sequence[Any]) -> None:
    """Validate a policy before any checkpoint is read: preset names, rules and the default action.

    ``"auto"`` is accepted here and resolved against the base config by :func:`resolve_policy`.

    Raises:
        ValueError: unknown preset, unknown key, malformed rule or unknown action (names the culprit).
    """
    if isinstance(policy, MergePolicy):
        return
    if isinstance(policy, str):
        if policy != "auto" and policy not in PRESETS:
            raise ValueError(f"unknown preset {policy!r}; known: {['auto', *sorted(PRESETS)]}")
        return
    if isinstance(policy, Mapping):
        unknown = sorted(set(policy) - {"preset", "rules", "default"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; a policy mapping has preset, rules and default")
        if policy.get("preset"):
            check_policy(str(policy["preset"]))
        if policy.get("default", "merge") not in ACTIONS:
            raise ValueError(f"default must be one of {ACTIONS}, got {policy.get('default')!r}")
        _rules(policy.get("rules") or [])
        return
    _rules(policy)


def _rules(items: Sequence[Any]) -> tuple[Rule, ...]:
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Rule):
            out.append(it)
        elif isinstance(it, Mapping) and set(it) <= {"pattern", "action"} and "pattern" in it and "action" in it:
            out.append(Rule(str(it["pattern"]), str(it["action"])))
        elif isinstance(it, (list, tuple)) and len(it) == 2:
            out.append(Rule(str(it[0]), str(it[1])))
        else:
            raise ValueError(f"policy rule #{i}: expected {{pattern, action}} or [pattern, action], got {it!r}")
    return tuple(out)
