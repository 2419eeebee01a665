"""Benchmark: mergelab's streaming engine against mergekit on a ~150M-parameter Llama-style model.

Builds a random Llama-style base (fp32, on-disk Hugging Face layout) and 3 experts (base + small random
perturbations) in a temporary directory, then merges them with task_arithmetic and ties, once with mergelab
(``mergelab merge``) and once with mergekit (``mergekit-yaml``; an optional benchmark dependency, never a runtime
one), each in a fresh subprocess. For every run it prints wall time, CPU time (user + system of the child, from
``wait4``) and peak anonymous RSS (``RssAnon`` of the child sampled every 10 ms from ``/proc``: file-backed mmap
pages of the inputs are not counted, as they are reclaimable), then the mergelab/mergekit ratios and the
ties/task_arithmetic time ratio. It also checks that both tools produce the same weights (max |diff|).

Both tools merge every tensor (mergelab runs with an empty policy) with the same semantics: task arithmetic is
``base + sum_i tau_i``, TIES keeps the top 20 % per tensor and takes the disjoint mean (mergekit ``normalize: true``).

Usage::

    python benchmarks/merge_vs_mergekit.py [--layers 14] [--hidden 768] [--threads 1] [--keep DIR]

Targets (issue 2): mergelab at most mergekit's time and memory for both methods; ties at most 2x task arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def build_models(root: Path, layers: int, hidden: int, inter: int, vocab: int, n_experts: int) -> list[Path]:
    """Write a random Llama-style base and perturbed experts (fp32, one safetensors shard each)."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float32", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    base = {k: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)) for k, s in shapes.items()}
    dirs = []
    for j in range(n_experts + 1):
        d = root / ("base" if j == 0 else f"expert{j}")
        d.mkdir()
        sd = base if j == 0 else {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))
        dirs.append(d)
        del sd
    return dirs


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` in a fresh process; return wall s, CPU s and peak anonymous RSS bytes (sampled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon(proc.pid))
            done.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.stdout.read() if proc.stdout else b""
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(out.decode(errors="replace")[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": peak, "maxrss": ru.ru_maxrss * 1024}


def max_diff(a: Path, b: Path) -> float:
    from mergelab.engine import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(ra.keys()) == set(rb.keys()), "the two outputs hold different tensors"
    return max(float((ra.get(k).float() - rb.get(k).float()).abs().max()) for k in ra.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads for both tools")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = ap.parse_args()
    mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    if not Path(mk).exists():
        raise SystemExit("mergekit-yaml not found: pip install 'mergelab[bench]'")
    root = Path(args.keep or tempfile.mkdtemp(prefix="mergebench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        t = time.perf_counter()
        base, *experts = build_models(root, args.layers, args.hidden, args.intermediate, args.vocab, args.experts)
        from mergelab.engine import CheckpointReader

        n_params = sum(i.nbytes // 4 for i in CheckpointReader(base).infos.values())
        print(f"built base + {len(experts)} experts: {n_params / 1e6:.1f}M params, fp32 "
              f"({n_params * 4 / 2**30:.2f} GiB each) in {time.perf_counter() - t:.1f} s; threads={args.threads}")
        rows = []
        for method in ("task_arithmetic", "ties"):
            params = {"lam": 1.0} if method == "task_arithmetic" else {"lam": 1.0, "density": 0.2}
            recipe = root / f"mergelab-{method}.yaml"
            recipe.write_text(json.dumps({"base": str(base), "experts": [str(e) for e in experts], "method": method,
                                          "params": params, "policy": [], "device": "cpu"}))
            out_ml = root / f"out-mergelab-{method}"
            ml = run([sys.executable, "-c",
                      f"import torch; torch.set_num_threads({args.threads}); "
                      "from mergelab.platform.cli import main; main()",
                      "merge", str(recipe), "--out", str(out_ml), "--overwrite", "--quiet", "--no-track"], env)
            mk_params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
            mk_cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                      "models": [{"model": str(e), "parameters": mk_params} for e in experts]}
            if method == "ties":
                mk_cfg["parameters"] = {"normalize": True}
            cfg_mk = root / f"mergekit-{method}.yaml"
            cfg_mk.write_text(json.dumps(mk_cfg))
            out_mk = root / f"out-mergekit-{method}"
            shutil.rmtree(out_mk, ignore_errors=True)
            mkr = run([mk, str(cfg_mk), str(out_mk), "--no-copy-tokenizer", "--quiet", "--no-write-model-card",
                       "-j", str(args.threads)], env)
            rows.append((method, ml, mkr, max_diff(out_ml, out_mk)))
        gib = 2**30
        print()
        print(f"{'method':16s} {'tool':9s} {'wall s':>8s} {'CPU s':>8s} {'peak RssAnon GiB':>17s} {'maxrss GiB':>11s}")
        for method, ml, mkr, _ in rows:
            for tool, r in (("mergelab", ml), ("mergekit", mkr)):
                print(f"{method:16s} {tool:9s} {r['wall']:8.1f} {r['cpu']:8.1f} {r['rss'] / gib:17.3f} "
                      f"{r['maxrss'] / gib:11.3f}")
        print()
        print(f"{'method':16s} {'wall ml/mk':>11s} {'CPU ml/mk':>10s} {'RssAnon ml/mk':>14s} {'max|ml-mk|':>11s}")
        for method, ml, mkr, diff in rows:
            print(f"{method:16s} {ml['wall'] / mkr['wall']:11.2f} {ml['cpu'] / mkr['cpu']:10.2f} "
                  f"{ml['rss'] / mkr['rss']:14.2f} {diff:11.2e}")
        (ta_ml, ta_mk), (ti_ml, ti_mk) = ((rows[0][1], rows[0][2]), (rows[1][1], rows[1][2]))
        print()
        print(f"ties / task_arithmetic wall time: mergelab {ti_ml['wall'] / ta_ml['wall']:.2f}x, "
              f"mergekit {ti_mk['wall'] / ta_mk['wall']:.2f}x (target for mergelab: <= 2x)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
