"""``python -m mergelab.bench.omni``: build the omni zoo if needed, merge, print the Table 5 layout (:func:`run`).

The output is quiet by default, like ``mergelab bench omni``: the experiment's own lines and tables, without
transformers' per-load progress bars, its logs or the libraries' Python warnings; ``-v`` (or ``MERGELAB_VERBOSE=1``)
keeps them all.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence

from mergelab.bench.omni.compose import MODES as COMPOSE_MODES
from mergelab.bench.omni.compose import parse_modes
from mergelab.bench.omni.table import run
from mergelab.hf import VERBOSE_ENV, verbose

QUIET_WARNINGS = r"(transformers|peft|torch|safetensors|huggingface_hub|accelerate)(\.|$)"
"""Libraries whose Python warnings only ``-v`` shows."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options of ``bench omni`` and run the experiment."""
    ap = argparse.ArgumentParser(prog="python -m mergelab.bench.omni", description=__doc__)
    ap.add_argument("--zoo", required=True, help="zoo root; <zoo>/omni/seed<k> is built when missing")
    ap.add_argument("--seeds", default="0", help="comma-separated zoo seeds (default 0)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes for the expert training and the evaluations (default: the usable cores)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--json-out", default=None, help="write the result JSON here")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: every paper method)")
    ap.add_argument("--lam", default=None, help="comma-separated lambda grid swept on val (default 0.5,1,1.5)")
    ap.add_argument("--settings", default=None, help="comma-separated expert settings: lora,full (default both)")
    ap.add_argument("--lora-merge", default="delta", help="LoRA merge modes: delta, factors (default delta)")
    ap.add_argument("--compose", default=",".join(COMPOSE_MODES),
                    help="online composition references: naivemc, damc, comma-separated, or none "
                         f"(default {','.join(COMPOSE_MODES)}; models compose/<mode>/<setting>)")
    ap.add_argument("--quick", action="store_true", help="test-sized models and evaluation")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="the libraries' own output too: transformers' progress bars and logs, Python warnings")
    a = ap.parse_args(argv)
    if a.verbose:
        os.environ[VERBOSE_ENV] = "1"
    with warnings.catch_warnings():
        if not verbose():
            warnings.filterwarnings("ignore", module=QUIET_WARNINGS)
        run(a.zoo, [int(s) for s in a.seeds.split(",")], jobs=a.jobs, device=a.device, json_out=a.json_out,
            quick=a.quick, methods=a.methods.split(",") if a.methods else None,
            lam_grid=[float(x) for x in a.lam.split(",")] if a.lam else None,
            settings=a.settings.split(",") if a.settings else None, lora_modes=a.lora_merge.split(","),
            compose=parse_modes(a.compose))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
