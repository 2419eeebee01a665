"""Hash of every method's merged weights on one zoo seed (full and LoRA experts): a refactor's behaviour check.

    python benchmarks/merge_hashes.py --out before.json            # record
    python benchmarks/merge_hashes.py --check before.json          # compare; exit 1 on any difference

The hash covers each output tensor's name, dtype, shape and bytes (not the file layout), so it is stable across
changes that only touch how a merge is written or tracked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ZOO = Path(__file__).resolve().parents[1] / "mergelab" / "bench" / "zoo"


def weights_hash(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sorted(sf.keys()):
                t = sf.get_tensor(k).contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def run_all(seed: int, methods: list[str] | None) -> dict[str, str]:
    import mergelab.methods as M

    try:  # the engine's home moved in the restructure; keep the script usable on both sides of it
        from mergelab.engine import merge
    except ImportError:  # pragma: no cover - before the move
        from mergelab.engine import merge  # type: ignore[no-redef]
    table = getattr(M, "METHODS", None) or M.REGISTRY
    names = methods or sorted(table)
    root = ZOO / f"seed{seed}"
    result: dict[str, str] = {}
    for setting in ("full", "lora"):
        experts = sorted(p for p in (root / setting).iterdir() if p.is_dir())
        for name in names:
            variants = [{}] if name != "optmerge" else [{"variant": "full", "steps": 5}, {"variant": "lora", "steps": 5}]
            for params in variants:
                key = f"{setting}/{name}" + (f"/{params['variant']}" if params else "")
                with tempfile.TemporaryDirectory() as tmp:
                    merge(base=root / "base", experts=experts, method=name, params=params, out=Path(tmp) / "m",
                          device="cpu", seed=0)
                    result[key] = weights_hash(Path(tmp) / "m")
                print(f"{key:40s} {result[key]}", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--check", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    got = run_all(a.seed, a.methods.split(",") if a.methods else None)
    if a.out:
        a.out.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if a.check:
        want = json.loads(a.check.read_text())
        bad = [k for k in want if k in got and got[k] != want[k]]
        print(f"compared {sum(k in got for k in want)} merges: {len(bad)} differ" + (f": {bad}" if bad else ""))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
