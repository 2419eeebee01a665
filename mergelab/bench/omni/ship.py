"""The omni zoo shipped in the package (``mergelab/bench/omni_zoo/``): seed 0's base and LoRA experts, prebuilt.

``mergelab demo``'s omni section merges these experts without training anything (building seed 0 from nothing
takes about 8 minutes on 2 cores). The shipped directory holds only what a campaign over
``experts: {omni_zoo: <shipped>, kind: lora, seed: 0}`` (:mod:`mergelab.platform.omni`) reads::

    omni/seed0/base/                       the base (weights, config, processor)
    omni/seed0/experts/lora/<m>/adapter/   each modality's peft adapter (LoRA on the LLM, its connector in
                                           modules_to_save), its base named relatively (``../../../../base``)
    omni/seed0/build.json                  the plan it was built from, seconds per step, the last losses

(not the experts' merged full weights nor the ``merge/`` layout of :mod:`mergelab.bench.omni.build`: the table's
``mergelab bench omni`` builds those itself in a zoo of its own). The plan is :func:`shipped_plan`, the default
:class:`~mergelab.bench.omni.build.OmniPlan` with the LoRA setting only; a test fails when the shipped
``build.json`` no longer records it.

Regenerate (about 8 minutes on a quiet 2-core machine: base 220 s, experts 87-125 s each in two processes)::

    python -m mergelab.bench.omni.ship [--work DIR] [--jobs 2]

``--work`` keeps the full build (and reuses one already there, if its plan is the shipped plan).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from mergelab.bench.omni.build import OmniPlan, build, seed_dir
from mergelab.bench.omni.data import MODALITIES

SHIPPED_OMNI_ZOO = Path(__file__).resolve().parents[1] / "omni_zoo"
"""The omni zoo root shipped in the package (``<root>/omni/seed0``)."""

SHIPPED_SEED = 0
SHIPPED_KIND = "lora"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_BASE = "../../../../base"
"""An adapter's ``base_model_name_or_path`` in the shipped zoo: the seed's base, relative to the adapter."""


def shipped_plan() -> OmniPlan:
    """The plan of the shipped zoo: the default :class:`OmniPlan` with the LoRA setting only."""
    return replace(OmniPlan(), settings=(SHIPPED_KIND,))


def recorded_plan(zoo: str | Path = SHIPPED_OMNI_ZOO, seed: int = SHIPPED_SEED) -> dict | None:
    """The plan a zoo's ``build.json`` records (None when there is none)."""
    manifest = seed_dir(zoo, seed) / "build.json"
    return json.loads(manifest.read_text()).get("plan") if manifest.is_file() else None


def is_current(zoo: str | Path = SHIPPED_OMNI_ZOO) -> bool:
    """Whether ``zoo`` records :func:`shipped_plan` (as JSON stores it)."""
    return recorded_plan(zoo) == json.loads(json.dumps(shipped_plan().to_dict()))


def copy_shipped(built: Path, dest: Path) -> None:
    """Copy the shipped subset of the built seed directory ``built`` to the seed directory ``dest`` (new)."""
    shutil.copytree(built / "base", dest / "base")
    for m in MODALITIES:
        src, dst = built / "experts" / SHIPPED_KIND / m / "adapter", dest / "experts" / SHIPPED_KIND / m / "adapter"
        dst.mkdir(parents=True)
        shutil.copy2(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = ADAPTER_BASE
        (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copy2(built / "build.json", dest / "build.json")


def ship(dest: str | Path = SHIPPED_OMNI_ZOO, *, work: str | Path | None = None, jobs: int = 2,
         device: str = "cpu", plan: OmniPlan | None = None, log: Callable[[str], None] = print) -> Path:
    """Build seed 0 with ``plan`` (default :func:`shipped_plan`; in ``work``, default a temporary directory) and
    replace ``dest``'s ``omni/seed0`` with its shipped subset; returns that seed directory."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="omni-ship-") as tmp:
        root = build(work or Path(tmp) / "zoo", SHIPPED_SEED, plan or shipped_plan(), jobs=jobs, device=device,
                     log=log)
        staged = Path(tempfile.mkdtemp(prefix=".omni-ship-", dir=dest.parent if dest.parent.is_dir() else None))
        try:
            copy_shipped(root, staged / "seed")
            target = seed_dir(dest, SHIPPED_SEED)
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            (staged / "seed").rename(target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log(f"shipped omni zoo: {target} ({size / 1e6:.1f} MB)")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mergelab.bench.omni.ship``: regenerate the shipped omni zoo from the current default plan."""
    ap = argparse.ArgumentParser(prog="python -m mergelab.bench.omni.ship", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(SHIPPED_OMNI_ZOO), help="zoo root to write (default: the package's)")
    ap.add_argument("--work", default=None, help="build here (kept; reused when built with the shipped plan)")
    ap.add_argument("--jobs", type=int, default=2, help="processes for expert training (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    a = ap.parse_args(argv)
    ship(a.dest, work=a.work, jobs=a.jobs, device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
