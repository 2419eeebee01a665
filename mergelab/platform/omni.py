"""The omni benchmark on the platform: a campaign's omni experts, and the base and experts as reference runs.

* :func:`omni_template`: a campaign's ``experts: {omni_zoo: DIR, kind: lora, seed: 0}``
  (:class:`~mergelab.platform.campaign_config.OmniZooRef`) resolved to a recipe template: the seed's whole base
  ``<DIR>/omni/seed<k>/base`` and one expert per modality, named ``image``, ``audio``, ``video``: the peft
  adapter ``experts/lora/<m>/adapter`` (LoRA on the LLM, the connector in ``modules_to_save``: the paper's
  setting) or the full fine-tune ``experts/full/<m>``. With ``policy: auto`` the ``omni_thinker`` preset takes
  every tower and connector from its one owner. A zoo not built yet is built first (:func:`mergelab.bench.omni.build.build`)
  when the campaign runs; ``--dry-run`` builds nothing (:class:`OmniZooMissing`).
* :func:`log_omni_references`: after ``mergelab bench omni --track``, the base (all media), each expert (only its
  own medium, as the table scores it) and each online composition (``compose/<mode>/<setting>``: not a merge, no
  weights of its own) as reference runs of the same experiment, tagged like the capability benchmark's references
  (``mergelab.role = reference``, ``mergelab.reference``, ``mergelab.path``) and holding the same ``test/*``
  metric names as the tracked merges, so the UI compares them with the merges.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from mergelab.engine import ExpertSpec, MergeRecipe
from mergelab.platform.campaign_config import CampaignConfig, OmniZooRef
from mergelab.platform.store import TAG_ROLE, Store, log_scores

MODALITIES = ("image", "audio", "video")
"""The omni experts, in the zoo's order (:data:`mergelab.bench.omni.data.MODALITIES`)."""

TAG_OMNI = "mergelab.omni"
"""Tag of every omni run (merges and references): its name in the omni table (``seed<k>/...``)."""
TAG_REFERENCE = "mergelab.reference"
TAG_PATH = "mergelab.path"
TAG_BUILD = "mergelab.omni.build"  # the zoo's build plan (hash) and the evaluation sizes a reference was scored with


class OmniZooMissing(ValueError):
    """An omni zoo reference whose checkpoints are not built yet (the campaign builds them; a dry run does not)."""


def omni_paths(ref: OmniZooRef) -> tuple[Path, list[tuple[str, Path]]]:
    """``(base, [(modality, expert directory)])`` of an omni zoo reference (nothing is read)."""
    root = Path(ref.omni_zoo) / "omni" / f"seed{ref.seed}"
    experts = root / "experts" / ref.kind
    names = list(ref.modalities or MODALITIES)
    return root / "base", [(m, experts / m / "adapter" if ref.kind == "lora" else experts / m) for m in names]


def _built(base: Path, experts: list[tuple[str, Path]]) -> bool:
    weights = ("model.safetensors", "adapter_model.safetensors")
    return all(any((p / w).is_file() for w in weights) for p in [base, *(e for _, e in experts)])


def build_omni_zoo(ref: OmniZooRef, device: str = "auto", log: Callable[[str], None] = print) -> None:
    """Build what ``ref``'s seed is missing: the default plan (``quick``: the test-sized one) with ``ref.kind``.

    A seed already built by that plan with other expert settings (the quick plan builds LoRA experts only) keeps its
    base and manifest: only ``ref.kind``'s missing experts are trained on it (another plan is an error, as for
    :func:`~mergelab.bench.omni.build.build`).
    """
    from mergelab.bench.omni.build import OmniPlan, build, build_expert, seed_dir  # transformers: seconds

    plan = OmniPlan.quick() if ref.quick else OmniPlan()
    root = seed_dir(ref.omni_zoo, ref.seed)
    manifest = root / "build.json"
    built = json.loads(manifest.read_text()).get("plan") if manifest.is_file() else None
    if built and ref.kind not in built.get("settings", ()):
        same = replace(plan, settings=tuple(built["settings"])).to_dict()
        if json.loads(json.dumps(same)) == built:  # as the manifest stores it
            for m in ref.modalities or MODALITIES:
                if not (root / "merge" / ref.kind / m / "model.safetensors").is_file():
                    entry = build_expert(root, plan, ref.seed, ref.kind, m, device)
                    log(f"omni seed {ref.seed}: {ref.kind} {m} expert in {entry['seconds']:.0f} s")
            return
    if ref.kind not in plan.settings:
        plan = replace(plan, settings=(*plan.settings, ref.kind))
    log(f"building the omni zoo {ref.omni_zoo} (seed {ref.seed}, {ref.kind} experts)")
    build(ref.omni_zoo, ref.seed, plan, device=device, log=log)


def omni_template(cfg: CampaignConfig, source: str = "campaign", *,
                  build_missing: bool = False) -> tuple[MergeRecipe, dict[str, float]]:
    """The recipe template of a campaign over omni experts (``cfg.experts`` an :class:`OmniZooRef`), and no
    reference scores (the omni zoo records none).

    Raises:
        OmniZooMissing: the checkpoints are not built and ``build_missing`` is false.
    """
    ref = cfg.experts
    if not isinstance(ref, OmniZooRef):
        raise TypeError(f"{source}: experts is not an omni zoo reference")
    base, experts = omni_paths(ref)
    if not _built(base, experts):
        if not build_missing:
            raise OmniZooMissing(f"the omni zoo {base.parent} is not built yet ({ref.kind} experts); "
                                 "`mergelab campaign` builds it first")
        build_omni_zoo(ref, cfg.device)
    specs = [ExpertSpec(str(path), None, name) for name, path in experts]
    return cfg.to_recipe(source, base=str(cfg.base or base), experts=specs), {}


def build_key(root: Path, sizes: Any) -> str:
    """A short hash of the seed's build plan and the evaluation sizes (what a reference run's scores depend on)."""
    manifest = root / "build.json"
    plan = json.loads(manifest.read_text()).get("plan") if manifest.is_file() else None
    text = json.dumps({"plan": plan, "sizes": sizes.__dict__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_run(client: MlflowClient, exp_id: str, label: str, path: Path, key: str,
                  scores: Callable[[], Mapping[str, float]]) -> tuple[str, bool]:
    """The FINISHED reference run ``label`` of this build (reused), or a new one logging ``test/<metric>`` of
    ``scores()``; returns ``(run id, reused)``."""
    filt = (f"tags.`{TAG_ROLE}` = 'reference' and tags.`{TAG_OMNI}` = '{label}' and tags.`{TAG_BUILD}` = '{key}' "
            "and attributes.status = 'FINISHED'")
    old = client.search_runs([exp_id], filter_string=filt, max_results=1)
    if old:
        return old[0].info.run_id, True
    run = client.create_run(exp_id, run_name=label, tags={TAG_ROLE: "reference", TAG_REFERENCE: label,
                                                          TAG_OMNI: label, TAG_PATH: str(path), TAG_BUILD: key})
    log_scores(client, run.info.run_id, {f"test/{k}": float(v) for k, v in scores().items()})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id, False


def log_omni_references(store: Store, experiment: str, result: Mapping[str, Any], zoo: str | Path, *,
                        quick: bool = False, device: str = "cpu",
                        log: Callable[[str], None] = print) -> dict[str, str]:
    """Log the base and each expert of an omni table ``result`` (:func:`mergelab.bench.omni.table.run`) as
    reference runs of ``experiment``; returns ``{label: run id}``.

    Each expert's scores are the table's own (its medium only), as are each online composition's (all media; path:
    the setting's experts directory); the base is scored here on the same test items with all media. Labels:
    ``seed<k>/base``, ``seed<k>/expert/<modality>/<setting>`` and ``seed<k>/compose/<mode>/<setting>``, the table's
    model names. A reference of the same build and evaluation sizes already logged is reused.
    """
    from mergelab.bench.omni import table  # transformers and the omni model code: seconds
    from mergelab.bench.omni.build import seed_dir
    from mergelab.hf import load_model

    sizes = table.EvalSizes.quick() if quick else table.EvalSizes()
    client = store.client()
    exp_id = store.experiment_id(experiment, client)
    out: dict[str, str] = {}
    for seed, per_seed in zip(result["seeds"], result["per_seed"], strict=True):
        root = seed_dir(zoo, seed)
        key = build_key(root, sizes)

        def base_scores(root: Path = root, seed: int = seed) -> Mapping[str, float]:
            model, processor = load_model(root / "base", device=device)
            return table.evaluate(model, processor, table.eval_items("test", sizes, seed))

        labels = [(f"seed{seed}/base", root / "base", base_scores)]
        for name, scores in per_seed["models"].items():
            kind, part, setting = (name.split("/") + ["", ""])[:3]
            if kind in ("expert", "compose"):
                path = root / "experts" / setting / (part if kind == "expert" else "")
                labels.append((f"seed{seed}/{name}", path, lambda scores=scores: scores))
        for label, path, scores_fn in labels:
            out[label], reused = reference_run(client, exp_id, label, path, key, scores_fn)
            log(f"omni reference {label}: run {out[label][:8]}{' reused' if reused else ''}")
    return out


__all__ = ["OmniZooMissing", "build_omni_zoo", "log_omni_references", "omni_paths", "omni_template"]
