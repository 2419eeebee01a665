"""How much of Iso-C's output norm lies outside the LoRA experts' span, per tensor, on one zoo seed.

    OMP_NUM_THREADS=1 python benchmarks/iso_c_lora_span.py [--seed 0]

For every LoRA-adapted weight, the task vectors are ``tau_i = (alpha / r) B_i A_i`` (float32, as the engine forms
them); the tasks' joint span is ``col([B_1 .. B_T])`` on the left and ``row([A_1; ..; A_T])`` on the right (computed
in float64). The share outside is ``1 - ||P_L O P_R||^2 / ||O||^2`` for Iso-C's output ``O``, with the paper's Iso-C
and with ``span_only=True``. Prints one line per tensor kind and the norm-weighted total.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from mergelab.methods import METHODS, MergeContext

ZOO = Path(__file__).resolve().parents[1] / "mergelab" / "bench" / "zoo"


def load_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module: (B, A, scaling)}`` of one PEFT LoRA adapter (plain LoRA: scaling = alpha / r)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = float(cfg["lora_alpha"]) / float(cfg["r"])
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if ".lora_A." in k:
                mod = k.split(".lora_A.")[0]
                out[mod] = (f.get_tensor(mod + ".lora_B.weight"), f.get_tensor(k), scaling)
    return out


def share_outside(o: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[float, float]:
    """``(||O||^2, ||O||^2 outside)`` for orthonormal bases ``left`` (m x a) and ``right`` (n x b) of the span."""
    o = o.double()
    inside = left @ ((left.T @ o) @ right) @ right.T
    total = float(o.square().sum())
    return total, total - float(inside.square().sum())


def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``x`` (numerical rank, float64)."""
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, s > s.max() * max(x.shape) * torch.finfo(torch.float64).eps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    experts = sorted(p for p in (ZOO / f"seed{a.seed}" / "lora").iterdir() if p.is_dir())
    factors = [load_factors(p) for p in experts]
    spec = METHODS["iso_c"]
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for mod in sorted(factors[0]):
        taus = torch.stack([(s * b @ a_).float() for b, a_, s in (f[mod] for f in factors)])
        left = orthonormal_basis(torch.cat([f[mod][0] for f in factors], dim=1))
        right = orthonormal_basis(torch.cat([f[mod][1] for f in factors], dim=0).T)
        kind = re.sub(r".*\.", "", mod)
        for j, params in enumerate(({}, {"span_only": True})):
            out = spec.fn(torch.zeros(taus.shape[1:]), taus, spec.make_config(params), MergeContext(name=mod))
            tot, outside = share_outside(out, left, right)
            sums[kind][2 * j] += tot
            sums[kind][2 * j + 1] += outside
    print(
        f"zoo seed{a.seed}, {len(experts)} LoRA experts (rank {factors[0][next(iter(factors[0]))][1].shape[0]}), "
        f"share of ||Iso-C output||^2 outside the tasks' joint span"
    )
    print(f"{'tensor kind':12s} {'paper Iso-C':>12s} {'span_only':>10s}")
    tot = [0.0] * 4
    for kind, v in sorted(sums.items()):
        print(f"{kind:12s} {100 * v[1] / v[0]:11.1f}% {100 * v[3] / v[2]:9.2f}%")
        tot = [x + y for x, y in zip(tot, v, strict=True)]
    print(f"{'all':12s} {100 * tot[1] / tot[0]:11.1f}% {100 * tot[3] / tot[2]:9.2f}%")
    print(f"||output||_F (root of summed squares): paper {tot[0] ** 0.5:.3f}, span_only {tot[2] ** 0.5:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
