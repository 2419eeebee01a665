"""Why a modality merge fails where it does: per-layer interference of the experts' LLM deltas, and what the
merged model answers instead (answer-word overlap between modalities).

* :func:`delta_interference`: for every merged LLM tensor, each expert's delta norm, the pairwise cosines, and how
  much of each expert's delta survives a merged delta (``<tau_m, tau_i> / |tau_i|^2``, 1 = kept in full).
* :func:`answer_confusion`: for each question type, the share of answers that are right, another word of the
  same fact, a word of another modality's facts, or anything else.
* :func:`context_effect`: an expert's accuracy on its own questions with only its medium vs with all three media
  in the prompt (interference from the other modalities' tokens, before any merging).
* :func:`connector_effect`: the merged model's accuracy on each modality's cross-modal questions, all three media
  in the prompt, as merged (every connector from its expert) and with the *other* modalities' connectors put back
  to the base's: how much of a modality's loss in the merge comes from the other experts' trained connectors.

``python -m mergelab.bench.omni.analysis --zoo DIR`` prints all four for seed 0's LoRA experts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergelab.bench.omni import data, metrics
from mergelab.bench.omni.build import seed_dir
from mergelab.bench.omni.train import TOWERS, answers


def deltas(root: Path, setting: str) -> dict[str, list[torch.Tensor]]:
    """``{LLM tensor: [delta of the image, audio, video expert]}`` (2-D tensors that differ from the base)."""
    base = load_file(str(root / "merge" / "base" / "model.safetensors"))
    experts = [load_file(str(root / "merge" / setting / m / "model.safetensors")) for m in data.MODALITIES]
    out = {}
    for k, b in base.items():
        if b.ndim != 2 or k.startswith(tuple(TOWERS.values())):
            continue
        ds = [e[k].float() - b.float() for e in experts]
        if any(float(d.abs().max()) > 0 for d in ds):
            out[k] = ds
    return out


def delta_interference(task_vectors: Mapping[str, Sequence[torch.Tensor]],
                       merged: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """One row per tensor: ``norm/<m>``, ``cos/<m1>-<m2>``, and with ``merged`` deltas ``kept/<m>``."""
    names = data.MODALITIES
    rows = []
    for k, ds in task_vectors.items():
        row: dict[str, Any] = {"tensor": k}
        flat = [d.flatten() for d in ds]
        for m, f in zip(names, flat, strict=True):
            row[f"norm/{m}"] = float(f.norm())
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                den = float(flat[i].norm() * flat[j].norm())
                row[f"cos/{names[i]}-{names[j]}"] = float(flat[i] @ flat[j]) / den if den else 0.0
        if merged is not None and k in merged:
            tm = merged[k].flatten().float()
            for m, f in zip(names, flat, strict=True):
                n2 = float(f @ f)
                row[f"kept/{m}"] = float(tm @ f) / n2 if n2 else 0.0
        rows.append(row)
    return rows


def merged_deltas(root: Path, merged_dir: Path) -> dict[str, torch.Tensor]:
    """The merged model's LLM deltas against the base."""
    base = load_file(str(root / "merge" / "base" / "model.safetensors"))
    merged = load_file(str(Path(merged_dir) / "model.safetensors"))
    return {k: merged[k].float() - b.float() for k, b in base.items() if k in merged and b.ndim == 2}


def by_layer(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows averaged per decoder layer (and one ``other`` group)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        parts = r["tensor"].split(".")
        key = f"layer {parts[parts.index('layers') + 1]}" if "layers" in parts else "other"
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        cols = [c for c in rs[0] if c != "tensor"]
        out.append({"group": key, **{c: statistics.fmean(float(r[c]) for r in rs if c in r) for c in cols}})
    return out


def answer_confusion(samples: Sequence[data.OmniSample], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per question type, percent of answers: ``right``, ``same_fact`` (another answer word of the asked fact),
    ``other_modality`` (an answer word of another modality's facts), ``other`` (anything else)."""
    vocab = {m: {w for t, (mm, _, ws) in data.TASKS.items() if mm == m for w in ws} for m in data.MODALITIES}
    out: dict[str, dict[str, list[float]]] = {}
    for s, p in zip(samples, predictions, strict=True):
        if s.qtype not in data.TASKS:
            continue
        word = p.split()[0].strip(".,").lower() if p.strip() else ""
        if s.choices and len(word) == 1 and word.upper() in "ABCD"[: len(s.choices)]:
            word = s.choices["ABCD".index(word.upper())]
        modality = data.TASKS[s.qtype][0]
        right = metrics.item_score(s.task, p, s.answer) == 1.0
        if right:
            kind = "right"
        elif word in data.TASKS[s.qtype][2]:
            kind = "same_fact"
        elif any(word in vocab[m] for m in data.MODALITIES if m != modality):
            kind = "other_modality"
        else:
            kind = "other"
        out.setdefault(s.qtype, {k: [] for k in ("right", "same_fact", "other_modality", "other")})
        for k in out[s.qtype]:
            out[s.qtype][k].append(100.0 * (k == kind))
    return {q: {k: statistics.fmean(v) for k, v in d.items()} for q, d in out.items()}


def context_effect(model: Any, processor: Any, modality: str, samples: Sequence[data.OmniSample]) -> dict[str, float]:
    """An expert's accuracy on the cross-modal items about its modality: its medium only vs all three media."""
    own = [s for s in samples if s.qtype in data.TASKS and data.TASKS[s.qtype][0] == modality]
    alone = [s.only((modality,)) for s in own]
    return {"only_own": metrics.score(own, answers(model, processor, alone))["accuracy"],
            "all_media": metrics.score(own, answers(model, processor, own))["accuracy"]}


def with_base_connectors(model: Any, base_state: Mapping[str, torch.Tensor], keep: str) -> Any:
    """``model`` (changed in place) with every tower tensor of the modalities other than ``keep`` set to the base's
    (``base_state``: the base's state dict). Returns ``model``."""
    others = tuple(p for m, p in TOWERS.items() if m != keep)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.startswith(others):
                v.copy_(base_state[k])
    return model


def connector_effect(load: Any, processor: Any, base_state: Mapping[str, torch.Tensor],
                     samples: Sequence[data.OmniSample], preds: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Per modality, the merged model's accuracy on the cross-modal items about that modality (all three media in
    the prompt): ``merged`` as it is, ``own_connector_only`` with the other two modalities' towers (their
    connectors) put back to the base's. ``load()`` returns a fresh copy of the merged model; ``preds``, the merged
    model's answers to ``samples`` when already known."""
    preds = answers(load(), processor, samples) if preds is None else preds
    out = {}
    for m in data.MODALITIES:
        idx = [i for i, s in enumerate(samples) if s.qtype in data.TASKS and data.TASKS[s.qtype][0] == m]
        own = [samples[i] for i in idx]
        swapped = answers(with_base_connectors(load(), base_state, m), processor, own)
        out[m] = {"merged": metrics.score(own, [preds[i] for i in idx])["accuracy"],
                  "own_connector_only": metrics.score(own, swapped)["accuracy"]}
    return out


def _fmt(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    cols = [c for c in rows[0] if c != key]
    lines = [key.ljust(10) + "".join(c.rjust(19) for c in cols)]
    lines += [str(r[key]).ljust(10) + "".join(f"{float(r[c]):19.3f}" for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the three analyses for one seed, setting and merge."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mergelab.bench.omni.table import merge_experts

    ap = argparse.ArgumentParser(prog="python -m mergelab.bench.omni.analysis", description=__doc__)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", default="lora")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=84, help="cross-modal items per set")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = seed_dir(a.zoo, a.seed)
    processor = AutoProcessor.from_pretrained(root / "base")
    tv = deltas(root, a.setting)
    cross = [s for c in data.CROSS_SETS for s in data.cross_samples(c, "test", a.n, a.seed)]
    with tempfile.TemporaryDirectory() as tmp:
        merge_experts(root, a.setting, a.method, a.lam, Path(tmp) / "m")
        rows = delta_interference(tv, merged_deltas(root, Path(tmp) / "m"))
        def load_merged() -> Any:
            return AutoModelForImageTextToText.from_pretrained(Path(tmp) / "m", use_safetensors=True).eval()

        preds = answers(load_merged(), processor, cross)
        base_state = load_file(str(root / "base" / "model.safetensors"))
        conn = connector_effect(load_merged, processor, base_state, cross, preds)
    print(f"per-layer interference, {a.setting} experts, {a.method} lam {a.lam}:")
    print(_fmt(by_layer(rows), "group"))
    print("\nanswers of the merge on the cross-modal sets (percent per question type):")
    conf = answer_confusion(cross, preds)
    print(_fmt([{"qtype": q, **v} for q, v in conf.items()], "qtype"))
    print("\neach expert on its own cross-modal questions: its medium only vs all three media:")
    for m in data.MODALITIES:
        expert = AutoModelForImageTextToText.from_pretrained(root / "experts" / a.setting / m, use_safetensors=True).eval()
        print(m, context_effect(expert, processor, m, cross))
    print("\nthe merge on each modality's cross-modal questions: as merged vs the other connectors put back to the "
          "base's:")
    for m, v in conn.items():
        print(m, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
