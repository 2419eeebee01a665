"""Benchmark at realistic scale: InternVL2.5-1B, Qwen2-VL-2B and a Qwen2-VL-7B layer subset, with random weights.

Builds, in a scratch directory, random-weight checkpoints with the exact tensor names, shapes, dtype (bf16) and shard
count of the published checkpoints (configs written from their documented values; nothing is downloaded), plus N full
experts (base + small noise) and N LoRA adapters (r 128, alpha 256, every linear of the LLM's decoder layers, the
on-disk key names PEFT writes). ``--scale`` keeps that fraction of the decoder and vision layers (embeddings and
``lm_head`` keep their full size: they are the largest tensors); the 7B subset has ``--big-layers`` decoder layers,
the vision tower (scaled) and the merger, no embeddings. Shards are filled in state-dict order, with the published
number of shards (InternVL2.5-1B: 1 file; Qwen2-VL-2B: 2; Qwen2-VL-7B: 5, scaled with the bytes kept).

Then it times, each run in a fresh process, side by side:

* mergelab (the engine, ``merge(...)``) vs mergekit 0.1.5 (``mergekit-yaml``) for task_arithmetic and ties (density
  0.2, disjoint mean) on the full experts, every tensor merged by both, float32 compute, bf16 output; mergekit reads
  the same weight files through a view directory whose ``config.json`` makes it infer the tensors from their names
  (its JSON architectures do not fit these VLM checkpoints under transformers 5); the outputs are compared (max |diff|
  and tensor count);
* the I/O floor: reading every input file once and writing the output's bytes once, with plain reads into one
  reused buffer, on the same files, ``--repeats`` times (default 3), the fastest kept: its wall time moves by up
  to 5x between runs on the same files (page cache, write-back), and noise only ever adds to a floor; each
  mergelab merge runs ``--repeats`` times too (OptMerge and SWUDI once), its row the median by engine wall;
* mergelab on the LoRA adapters (task_arithmetic, ties, OptMerge ``lora``) and, with the family's policy (``auto``,
  the paper's scripts), OptMerge ``full`` and SWUDI on the full experts: whole-model time and memory.

Memory is the child's peak RSS (``VmHWM``, sampled every 10 ms: mapped file pages included) and its sampled peak
anonymous RSS; the bound printed beside it is ``(N + 1) x`` the largest tensor. Timings on a shared machine are
indicative. Targets on CPU (printed PASS/FAIL): task_arithmetic and ties at most 0.5x mergekit's wall time and at most
3x the I/O floor; peak RSS at most ``2 x (N + 1) x largest + 500 MB`` and below mergekit's.

Usage::

    python benchmarks/realistic.py                              # CPU defaults: 1 layer each, 1/4 vocabulary, N = 2
    python benchmarks/realistic.py --scale 1 --vocab-scale 1 --experts 5 --big-layers 4   # full size (~2 GB/1B/copy)
    python benchmarks/realistic.py --device cuda --cross-check  # GPU: every method, GPU vs CPU relative error
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_vs_mergekit  # noqa: E402  (the child-process timing and RSS sampling of the 150M benchmark)

GB = 1e9
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMOTE_CODE = ("configuration_intern_vit.py", "configuration_internvl_chat.py", "conversation.py",
               "modeling_intern_vit.py", "modeling_internvl_chat.py")

# --------------------------------------------------------------------------------------------------------------
# Published configurations (documented values of the Hugging Face model cards' config.json)

INTERNVL2_5_1B: dict[str, Any] = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                 "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
    "downsample_ratio": 0.5, "force_image_size": 448, "template": "internvl2_5", "ps_version": "v2",
    "select_layer": -1, "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                   "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "vocab_size": 151674, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                   "torch_dtype": "bfloat16"},
    "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
                      "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "image_size": 448, "patch_size": 14, "num_channels": 3, "qkv_bias": True,
                      "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
                      "hidden_act": "gelu", "torch_dtype": "bfloat16"},
}

_QWEN2_VL_COMMON: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": "bfloat16",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "attention_dropout": 0.0,
    "sliding_window": 32768, "use_sliding_window": False, "use_cache": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B: dict[str, Any] = {
    **_QWEN2_VL_COMMON, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "max_window_layers": 28,
    "tie_word_embeddings": True,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
QWEN2_VL_7B: dict[str, Any] = {
    **_QWEN2_VL_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_window_layers": 28,
    "tie_word_embeddings": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}

Shapes = list[tuple[str, tuple[int, ...]]]


def _qwen2_layers(prefix: str, c: dict[str, Any], layers: int) -> Shapes:
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    out: Shapes = []
    for n in range(layers):
        p = f"{prefix}layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out


def internvl_shapes(c: dict[str, Any], llm_layers: int, vit_layers: int) -> Shapes:
    """InternVLChatModel's state dict in order: vision_model, language_model, mlp1."""
    v, lc = c["vision_config"], c["llm_config"]
    d, f = v["hidden_size"], v["intermediate_size"]
    n_pos = (v["image_size"] // v["patch_size"]) ** 2 + 1
    out: Shapes = [("vision_model.embeddings.class_embedding", (1, 1, d)),
                   ("vision_model.embeddings.patch_embedding.weight", (d, 3, v["patch_size"], v["patch_size"])),
                   ("vision_model.embeddings.patch_embedding.bias", (d,)),
                   ("vision_model.embeddings.position_embedding", (1, n_pos, d))]
    for n in range(vit_layers):
        p = f"vision_model.encoder.layers.{n}."
        out += [(p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)), (p + "attn.proj.weight", (d, d)),
                (p + "attn.proj.bias", (d,)), (p + "ls1", (d,)), (p + "ls2", (d,)), (p + "mlp.fc1.weight", (f, d)),
                (p + "mlp.fc1.bias", (f,)), (p + "mlp.fc2.weight", (d, f)), (p + "mlp.fc2.bias", (d,)),
                (p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)), (p + "norm2.weight", (d,)),
                (p + "norm2.bias", (d,))]
    h = lc["hidden_size"]
    out.append(("language_model.model.embed_tokens.weight", (lc["vocab_size"], h)))
    out += _qwen2_layers("language_model.model.", lc, llm_layers)
    out += [("language_model.model.norm.weight", (h,)), ("language_model.lm_head.weight", (lc["vocab_size"], h))]
    m = d * int(1 / c["downsample_ratio"]) ** 2
    out += [("mlp1.0.weight", (m,)), ("mlp1.0.bias", (m,)), ("mlp1.1.weight", (h, m)), ("mlp1.1.bias", (h,)),
            ("mlp1.3.weight", (h, h)), ("mlp1.3.bias", (h,))]
    return out


def qwen2_vl_shapes(c: dict[str, Any], llm_layers: int, vit_layers: int, embeddings: bool = True) -> Shapes:
    """Qwen2VLForConditionalGeneration's state dict in order (transformers 4.x on-disk names): visual, model, lm_head."""
    v, h = c["vision_config"], c["hidden_size"]
    d, ps, m = v["embed_dim"], v["patch_size"], v["embed_dim"] * v["spatial_merge_size"] ** 2
    out: Shapes = [("visual.patch_embed.proj.weight", (d, v["in_chans"], v["temporal_patch_size"], ps, ps))]
    for n in range(vit_layers):
        p = f"visual.blocks.{n}."
        out += [(p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)), (p + "norm2.weight", (d,)),
                (p + "norm2.bias", (d,)), (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                (p + "mlp.fc1.weight", (d * v["mlp_ratio"], d)), (p + "mlp.fc1.bias", (d * v["mlp_ratio"],)),
                (p + "mlp.fc2.weight", (d, d * v["mlp_ratio"])), (p + "mlp.fc2.bias", (d,))]
    out += [("visual.merger.ln_q.weight", (d,)), ("visual.merger.ln_q.bias", (d,)),
            ("visual.merger.mlp.0.weight", (m, m)), ("visual.merger.mlp.0.bias", (m,)),
            ("visual.merger.mlp.2.weight", (h, m)), ("visual.merger.mlp.2.bias", (h,))]
    if embeddings:
        out.append(("model.embed_tokens.weight", (c["vocab_size"], h)))
    out += _qwen2_layers("model.", c, llm_layers)
    out.append(("model.norm.weight", (h,)))
    if embeddings and not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], h)))
    return out


# name: (config, shapes(config, llm layers, vit layers), LoRA key prefix of the LLM, published shard count)
FAMILIES: dict[str, tuple[dict[str, Any], Any, str, int]] = {
    "internvl2_5_1b": (INTERNVL2_5_1B, internvl_shapes, "base_model.model.language_model.model.", 1),
    "qwen2_vl_2b": (QWEN2_VL_2B, qwen2_vl_shapes, "base_model.model.model.", 2),
    "qwen2_vl_7b_subset": (QWEN2_VL_7B, lambda c, n, v: qwen2_vl_shapes(c, n, v, embeddings=False),
                           "base_model.model.model.", 5),
}


def _layers(cfg: dict[str, Any]) -> tuple[int, int]:
    if "llm_config" in cfg:
        return cfg["llm_config"]["num_hidden_layers"], cfg["vision_config"]["num_hidden_layers"]
    return cfg["num_hidden_layers"], cfg["vision_config"]["depth"]


def _nbytes(shapes: Shapes) -> int:
    return sum(math.prod(s) * 2 for _, s in shapes)


# --------------------------------------------------------------------------------------------------------------
# Building the checkpoints


def _save_sharded(tensors: dict[str, torch.Tensor], order: Shapes, d: Path, limit: int) -> None:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in order:
        nb = math.prod(shape) * 2
        if groups[-1] and size + nb > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nb
    if len(groups) == 1:
        save_file({k: tensors[k] for k in groups[0]}, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    wmap = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in g}, str(d / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in g})
    index = {"metadata": {"total_size": _nbytes(order)}, "weight_map": dict(sorted(wmap.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_family(root: Path, name: str, scale: float, n_experts: int, big_layers: int, gen_device: str,
                 vocab_scale: float = 1.0) -> dict[str, Any]:
    """Write base, ``n_experts`` full experts and ``n_experts`` LoRA adapters of one family under ``root/name``
    (``vocab_scale < 1`` keeps that fraction of the vocabulary: smaller embeddings, for quick runs)."""
    cfg, shapes_fn, lora_prefix, n_shards = FAMILIES[name]
    full_bytes = _nbytes(shapes_fn(cfg, *_layers(cfg)))
    if vocab_scale != 1.0:
        cfg = json.loads(json.dumps(cfg))
        text = cfg.get("llm_config", cfg)
        text["vocab_size"] = max(1, round(text["vocab_size"] * vocab_scale))
    llm_full, vit_full = _layers(cfg)
    llm = big_layers if name.endswith("subset") else max(1, round(llm_full * scale))
    vit = max(1, round(vit_full * scale))
    order = shapes_fn(cfg, llm, vit)
    total = _nbytes(order)
    limit = max(1, math.ceil(total / max(1, round(n_shards * total / full_bytes)))) if n_shards > 1 else 1 << 62
    fam = root / name
    g = torch.Generator(device=gen_device).manual_seed(0)

    def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=gen_device, dtype=torch.bfloat16) * std).cpu()

    base = {k: (torch.ones(s, dtype=torch.bfloat16) if k.endswith(("norm.weight", "norm1.weight", "norm2.weight",
                                                                    "layernorm.weight", "ln_q.weight", "mlp1.0.weight"))
                else randn(s, 0.02)) for k, s in order}
    side = {"config.json": json.dumps({**cfg, "_name_or_path": name}, indent=2)}
    if name.startswith("internvl"):
        side.update({f: "# remote code placeholder (the published checkpoint ships this file)\n" for f in REMOTE_CODE})
    dirs: dict[str, Any] = {"name": name, "llm_layers": llm, "vit_layers": vit, "experts": [], "loras": [],
                            "vocab": cfg.get("llm_config", cfg)["vocab_size"]}
    for j in range(n_experts + 1):
        d = fam / ("base" if j == 0 else f"expert{j}")
        d.mkdir(parents=True)
        sd = base if j == 0 else {k: v + randn(v.shape, 0.002) for k, v in base.items()}
        _save_sharded(sd, order, d, limit)
        for f, text in side.items():
            (d / f).write_text(text)
        if j:
            dirs["experts"].append(str(d))
        else:
            dirs["base"] = str(d)
        del sd
    h_cfg = cfg.get("llm_config", cfg)
    targets = [(k, s) for k, s in order if k.endswith(tuple(f"{m}.weight" for m in LINEARS)) and "layers." in k
               and not k.startswith(("visual", "vision_model"))]
    for j in range(1, n_experts + 1):
        d = fam / f"lora{j}"
        d.mkdir()
        ad = {}
        for k, (o, i) in targets:
            mod = lora_prefix + k[k.index("layers."):].removesuffix(".weight")
            ad[mod + ".lora_A.weight"] = randn((128, i), 1 / math.sqrt(i))
            ad[mod + ".lora_B.weight"] = randn((o, 128), 0.0005)
        save_file(ad, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 128, "lora_alpha": 256, "lora_dropout": 0.05,
            "target_modules": list(LINEARS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "base_model_name_or_path": dirs["base"]}))
        dirs["loras"].append(str(d))
    dirs.update(tensors=len(order), bytes=total, largest=max(math.prod(s) * 2 for _, s in order),
                params=total // 2, hidden=h_cfg["hidden_size"], shards=len(list(Path(dirs["base"]).glob("*.safetensors"))))
    return dirs


# --------------------------------------------------------------------------------------------------------------
# Child processes: one mergelab merge, the I/O floor


def child_merge(spec_file: str) -> None:
    """Run one mergelab merge (``spec``: merge(...) keyword arguments) and write the report's summary as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(int(spec.pop("threads")))
    report = Path(spec.pop("report"))
    from mergelab.engine import merge

    rep = merge(**spec, overwrite=True)
    report.write_text(json.dumps({"device": rep.device, "wall": rep.wall_seconds, "peak_rss_anon": rep.peak_rss_bytes,
                                  "peak_gpu": rep.peak_gpu_bytes, "tensors": len(rep.tensors)}))


# The I/O floor's child: read every input file once and write ``out_bytes`` once, plain reads into one reused buffer.
# Run as ``python -S -c FLOOR_CODE spec.json`` so that its time holds no imports beyond the standard library's core.
FLOOR_CODE = """
import json, sys
spec = json.load(open(sys.argv[1]))
buf = bytearray(64 << 20)
view = memoryview(buf)
for f in spec["inputs"]:
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass
left = int(spec["out_bytes"])
with open(spec["out"], "wb", buffering=0) as fh:
    while left > 0:
        left -= fh.write(view[: min(left, len(buf))])
"""


_HWM = {"peak": 0}


def _sample_status(pid: int) -> int:
    """The child's RssAnon (what ``merge_vs_mergekit.run`` samples), also tracking its VmHWM.

    VmHWM is the peak RSS of the child's own address space, mapped file pages included. ``ru_maxrss`` from ``wait4``
    is not used for it: the child inherits the hiwater mark of the parent's address space through vfork + exec, so
    it is never below the parent's own peak (here: the process that built the checkpoints).
    """
    anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    _HWM["peak"] = max(_HWM["peak"], int(line.split()[1]) * 1024)
    except OSError:
        pass
    return anon


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """``merge_vs_mergekit.run`` (wall, CPU, sampled peak RssAnon) plus ``hwm``: the child's peak RSS, file pages in."""
    _HWM["peak"] = 0
    merge_vs_mergekit._rss_anon = _sample_status
    r = merge_vs_mergekit.run(cmd, env)
    return {**r, "hwm": _HWM["peak"]}


def weight_files(d: str) -> list[str]:
    return sorted(str(p) for p in Path(d).glob("*.safetensors"))


def mergekit_view(d: str, root: Path) -> str:
    """A directory of links to ``d``'s weight files whose config makes mergekit infer tensors from their names."""
    v = root / "mergekit-view" / Path(d).parent.name / Path(d).name
    v.mkdir(parents=True, exist_ok=True)
    for f in Path(d).iterdir():
        if f.name.endswith((".safetensors", ".index.json")) and not (v / f.name).exists():
            (v / f.name).symlink_to(f)
    # A config transformers can load but not build as a causal LM: mergekit then takes the tensor names from the files.
    (v / "config.json").write_text(json.dumps({"architectures": ["MergelabBenchRaw"], "model_type": "vit",
                                               "torch_dtype": "bfloat16"}))
    return str(v)


# --------------------------------------------------------------------------------------------------------------
# Measuring


def machine(device: str) -> str:
    """One line naming the machine: CPU model and cores, memory, torch, GPU (when used), mergekit."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if device != "cpu" and torch.cuda.is_available() else "; no GPU used"
    try:
        from importlib.metadata import version

        mk = f"mergekit {version('mergekit')}"
    except Exception:  # noqa: BLE001 - the benchmark's optional dependency
        mk = "mergekit not installed"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()},"
            f" torch {torch.__version__}{gpu}; {mk}")


class Bench:
    """Runs the children of one benchmark and collects their rows."""

    def __init__(self, root: Path, threads: int, device: str, repeats: int = 3) -> None:
        self.root, self.threads, self.device, self.repeats = root, threads, device, max(1, repeats)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        self.rows: list[dict[str, Any]] = []
        self._n = 0

    def _spec(self, spec: dict[str, Any]) -> Path:
        self._n += 1
        p = self.root / "specs" / f"{self._n}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(spec))
        return p

    def add(self, family: str, kind: str, method: str, tool: str, r: dict[str, float], **extra: Any) -> dict[str, Any]:
        row = {"family": family, "experts": kind, "method": method, "tool": tool, "wall": r["wall"], "cpu": r["cpu"],
               "peak_rss": r["hwm"], "rss_anon": r["rss"], "load": os.getloadavg()[0], **extra}
        self.rows.append(row)
        print(f"  {family:20s} {kind:5s} {method:18s} {tool:9s} {r['wall']:7.1f} s  peak RSS {r['hwm'] / GB:5.2f} GB"
              f"  load {row['load']:.1f}", flush=True)
        return row

    def mergelab(self, fam: dict[str, Any], kind: str, method: str, params: dict[str, Any], policy: Any,
                 keep: bool = False) -> Path:
        out = self.root / "out" / f"{fam['name']}-{kind}-ml-{method}-{params.get('variant', '')}"
        report = out.with_suffix(".report.json")
        spec = {"base": fam["base"], "experts": fam["experts" if kind == "full" else "loras"], "method": method,
                "params": params, "policy": policy, "device": self.device, "out": str(out), "threads": self.threads,
                "report": str(report)}
        spec_file = str(self._spec(spec))
        runs = []  # the whole child --repeats times (OptMerge and SWUDI once): the row is the median by engine wall
        heavy = method in ("optmerge", "swudi")
        for _ in range(1 if heavy else self.repeats):
            r = run([sys.executable, __file__, "_merge", spec_file], self.env)
            runs.append((r, json.loads(report.read_text())))
        runs.sort(key=lambda x: x[1]["wall"])
        r, rep = runs[len(runs) // 2]
        label = method + (f"({params['variant']})" if "variant" in params else "")
        self.add(fam["name"], kind, label, "mergelab", r, device=rep["device"], engine_wall=rep["wall"],
                 peak_gpu=rep["peak_gpu"], engine_walls=[round(x[1]["wall"], 3) for x in runs])
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return out

    def mergekit(self, fam: dict[str, Any], method: str) -> Path:
        mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
        p = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
        cfg: dict[str, Any] = {"merge_method": method, "base_model": mergekit_view(fam["base"], self.root),
                               "dtype": "float32", "out_dtype": "bfloat16",
                               "models": [{"model": mergekit_view(e, self.root), "parameters": p}
                                          for e in fam["experts"]]}
        if method == "ties":
            cfg["parameters"] = {"normalize": True}
        out = self.root / "out" / f"{fam['name']}-full-mk-{method}"
        shutil.rmtree(out, ignore_errors=True)
        r = run([mk, str(self._spec(cfg)), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card",
                 "-j", str(self.threads)], self.env)
        self.add(fam["name"], "full", method, "mergekit", r)
        return out

    def floor(self, fam: dict[str, Any], kind: str) -> None:
        inputs = weight_files(fam["base"]) + [f for e in fam["experts" if kind == "full" else "loras"]
                                              for f in weight_files(e)]
        out = self.root / "out" / "floor.bin"
        out.parent.mkdir(exist_ok=True)
        spec = {"inputs": inputs, "out": str(out), "out_bytes": fam["bytes"]}
        spec_file = str(self._spec(spec))
        runs = []  # --repeats runs, the fastest kept: the floor is a lower bound, and noise only adds to it
        for _ in range(self.repeats):
            runs.append(run([sys.executable, "-S", "-c", FLOOR_CODE, spec_file], self.env))
            out.unlink(missing_ok=True)
        r = min(runs, key=lambda x: x["wall"])
        self.add(fam["name"], kind, "read+write", "I/O floor", r, walls=[round(x["wall"], 3) for x in runs])


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(tensors in a, tensors of a also in b, max |a - b| over those)."""
    from mergelab.engine import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    common = [k for k in ra.keys() if k in rb.infos]
    diff = max((float((ra.view(k).float() - rb.view(k).float()).abs().max()) for k in common), default=float("nan"))
    return len(ra.keys()), len(common), diff


def cross_check(fams: list[dict[str, Any]], root: Path, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """Every method (or ``methods``) on ``device="auto"`` and on the CPU over each family's full experts, policy
    ``auto``; the relative error of the merged task vector, ``||W_auto - W_cpu|| / ||W_cpu - W_base||`` over all
    tensors (DARE's random draws differ per device), and the device each report names."""
    from mergelab.engine import CheckpointReader, merge
    from mergelab.methods import METHODS

    runs = [(m, {}) for m in METHODS if m != "optmerge"] + [("optmerge", {"variant": v}) for v in ("full", "lora")]
    if methods:
        runs = [(m, p) for m, p in runs if m in methods or f"{m}_{p.get('variant', '')}" in methods]
    rows = []
    for fam in fams:
        base = CheckpointReader(fam["base"])
        for method, params in runs:
            outs, devs, walls = [], [], []
            for dev in ("auto", "cpu"):
                out = root / "cross" / f"{fam['name']}-{method}-{params.get('variant', '')}-{dev}"
                t = time.perf_counter()
                rep = merge(base=fam["base"], experts=fam["experts"], method=method, params=params, policy="auto",
                            device=dev, out=out, overwrite=True)
                walls.append(time.perf_counter() - t)
                outs.append(CheckpointReader(out))
                devs.append(rep.device)
            num = den = 0.0
            for k in outs[1].keys():
                w_cpu, b = outs[1].view(k).double(), base.view(k).double()
                num += float((outs[0].view(k).double() - w_cpu).pow(2).sum())
                den += float((w_cpu - b).pow(2).sum())
            rel = math.sqrt(num / den) if den else math.sqrt(num)
            label = method + (f"({params['variant']})" if params else "")
            row = {"family": fam["name"], "method": label, "device": devs[0], "wall_device": walls[0],
                   "wall_cpu": walls[1], "rel_err": rel, "random": method.startswith("dare")}
            rows.append(row)
            print(f"  {fam['name']:20s} {label:18s} merged on {devs[0]:7s} {walls[0]:7.1f} s   cpu {walls[1]:7.1f} s"
                  f"   rel err {rel:.2e}{'  (random draws differ per device)' if row['random'] else ''}", flush=True)
            shutil.rmtree(root / "cross", ignore_errors=True)
    return rows


def targets(rows: list[dict[str, Any]], fams: list[dict[str, Any]], n: int) -> list[tuple[str, bool, str]]:
    """The CPU targets, per family and method: (what, passed, numbers)."""
    out = []
    for fam in fams:
        by = {(r["method"], r["tool"], r["experts"]): r for r in rows if r["family"] == fam["name"]}
        floor = by.get(("read+write", "I/O floor", "full"))
        bound = 2 * (n + 1) * fam["largest"] + 500e6
        for m in ("task_arithmetic", "ties"):
            ml, mk = by.get((m, "mergelab", "full")), by.get((m, "mergekit", "full"))
            if ml is None:
                continue
            name = f"{fam['name']} {m}"
            if mk is not None:
                out.append((f"{name}: wall <= 0.5x mergekit", ml["wall"] <= 0.5 * mk["wall"],
                            f"{ml['wall']:.1f} s vs {mk['wall']:.1f} s = {ml['wall'] / mk['wall']:.2f}x"))
                out.append((f"{name}: peak RSS < mergekit's", ml["peak_rss"] < mk["peak_rss"],
                            f"{ml['peak_rss'] / GB:.2f} GB vs {mk['peak_rss'] / GB:.2f} GB"))
            if floor is not None:
                out.append((f"{name}: engine wall <= 3x I/O floor", ml["engine_wall"] <= 3 * floor["wall"],
                            f"{ml['engine_wall']:.1f} s vs {floor['wall']:.1f} s = "
                            f"{ml['engine_wall'] / floor['wall']:.2f}x"))
            out.append((f"{name}: peak RSS <= 2(N+1) x largest + 500 MB", ml["peak_rss"] <= bound,
                        f"{ml['peak_rss'] / GB:.2f} GB vs {bound / GB:.2f} GB"))
    return out


def print_table(rows: list[dict[str, Any]], fams: list[dict[str, Any]], n: int) -> None:
    print(f"\n{'family':20s} {'experts':7s} {'method':18s} {'tool':9s} {'device':7s} {'wall s':>7s} {'engine':>7s} "
          f"{'CPU s':>7s} "
          f"{'peak RSS GB':>11s} {'RssAnon GB':>10s} {'/(N+1)L':>8s} {'vs floor':>8s} {'vs mk':>6s} {'load':>5s}")
    for fam in fams:
        unit = (n + 1) * fam["largest"]
        fr = [r for r in rows if r["family"] == fam["name"]]
        floors = {r["experts"]: r for r in fr if r["tool"] == "I/O floor"}
        mks = {r["method"]: r for r in fr if r["tool"] == "mergekit"}
        for r in fr:
            fl = floors.get(r["experts"])
            mk = mks.get(r["method"]) if r["tool"] == "mergelab" and r["experts"] == "full" else None
            own = r.get("engine_wall", r["wall"])
            vs_floor = f"{own / fl['wall']:8.2f}" if fl and r["tool"] != "I/O floor" else f"{'':8s}"
            engine = f"{r['engine_wall']:7.1f}" if "engine_wall" in r else f"{'':7s}"
            vs_mk = f"{r['wall'] / mk['wall']:6.2f}" if mk else f"{'':6s}"
            load = f"{r['load']:5.1f}" if "load" in r else f"{'':5s}"
            print(f"{r['family']:20s} {r['experts']:7s} {r['method']:18s} {r['tool']:9s} {r.get('device', 'cpu'):7s} "
                  f"{r['wall']:7.1f} {engine} {r['cpu']:7.1f} {r['peak_rss'] / GB:11.2f} {r['rss_anon'] / GB:10.2f} "
                  f"{r['peak_rss'] / unit:8.2f} {vs_floor} {vs_mk} {load}")
    print("(wall: the child process, imports included; engine: the merge itself (MergeReport.wall_seconds); "
          "peak RSS: the child's VmHWM, mapped file pages included; RssAnon: its sampled peak anonymous RSS; "
          "/(N+1)L: peak RSS over (N + 1) x the largest tensor; vs floor: engine wall / floor wall; vs mk: process "
          "wall / mergekit's process wall; load: the 1-minute load average when the row ended)")


def print_targets(checks: list[tuple[str, bool, str]]) -> None:
    if checks:
        print("\ntargets (CPU):")
        for what, ok, nums in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}: {nums}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {list(FAMILIES)}")
    ap.add_argument("--scale", type=float, default=0.04, help="fraction of decoder and vision layers kept")
    ap.add_argument("--experts", type=int, default=2, help="N: full experts and LoRA adapters per family")
    ap.add_argument("--big-layers", type=int, default=1, help="decoder layers of the Qwen2-VL-7B subset")
    ap.add_argument("--vocab-scale", type=float, default=0.25, help="fraction of the vocabulary kept (embeddings)")
    ap.add_argument("--device", default="cpu", help="mergelab's device (cpu, cuda, auto)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads of every child (both tools)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each I/O floor (the fastest kept) and each mergelab merge but OptMerge and SWUDI "
                         "(the median by engine wall kept); mergekit runs once")
    ap.add_argument("--heavy", default=None,
                    help="whole-model runs of the optimising methods, from optmerge_full,swudi,optmerge_lora "
                         "(default: all three on a GPU, optmerge_lora on the CPU; '' for none)")
    ap.add_argument("--heavy-families", default=None,
                    help="families that get the --heavy runs (default: all on a GPU, internvl2_5_1b on the CPU)")
    ap.add_argument("--cross-check", action="store_true", help="every method on device auto vs CPU (rel. error)")
    ap.add_argument("--cross-methods", default="", help="restrict --cross-check to these methods (optmerge_full, ...)")
    ap.add_argument("--no-timings", action="store_true", help="build only (with --cross-check: only the check)")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None, help="print the table and targets of a --json-out file")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        n = int(saved["args"]["experts"])
        print(f"machine: {saved['machine']}")
        print_table(saved["rows"], saved["families"], n)
        if saved["args"]["device"] == "cpu":
            print_targets(targets(saved["rows"], saved["families"], n))
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="mergelab-realistic-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(args.device)}")
    print(f"scale {args.scale}, N = {args.experts} full experts + {args.experts} LoRA adapters (r 128), threads "
          f"{args.threads}, mergelab device {args.device}, scratch {root}", flush=True)
    bench = Bench(root, args.threads, args.device, args.repeats)
    fams: list[dict[str, Any]] = []
    if args.heavy is None:
        args.heavy = "optmerge_lora" if args.device == "cpu" else "optmerge_full,swudi,optmerge_lora"
    if args.heavy_families is None:
        args.heavy_families = "internvl2_5_1b" if args.device == "cpu" else args.families
    heavy_families = args.heavy_families.split(",")
    try:
        for name in args.families.split(","):
            t = time.perf_counter()
            fam = build_family(root, name, args.scale, args.experts, args.big_layers,
                               "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu",
                               args.vocab_scale)
            fams.append(fam)
            print(f"built {name}: {fam['llm_layers']} decoder + {fam['vit_layers']} vision layers, {fam['tensors']} "
                  f"tensors, vocab {fam['vocab']}, {fam['params'] / 1e6:.0f}M params, {fam['bytes'] / GB:.2f} GB bf16 in {fam['shards']} "
                  f"shard(s), largest tensor {fam['largest'] / 1e6:.0f} MB; {time.perf_counter() - t:.0f} s", flush=True)
            if args.no_timings:
                continue
            bench.floor(fam, "full")
            for m, p in (("task_arithmetic", {"lam": 1.0}), ("ties", {"lam": 1.0, "density": 0.2})):
                ml = bench.mergelab(fam, "full", m, p, [], keep=not args.no_mergekit)
                if not args.no_mergekit:
                    mk = bench.mergekit(fam, m)
                    n_ml, n_common, diff = compare(ml, mk)
                    bench.rows[-1].update(tensors=n_common, max_diff=diff)
                    print(f"    mergekit output holds {n_common}/{n_ml} of mergelab's tensors; max |diff| {diff:.2e}")
                    shutil.rmtree(mk, ignore_errors=True)
                    carried = all((ml / f).exists() for f in REMOTE_CODE) if name.startswith("internvl") else None
                    if carried is not None:
                        print(f"    remote-code files in mergelab's output: {'all' if carried else 'MISSING'}")
                    shutil.rmtree(ml, ignore_errors=True)
            heavy = [h for h in args.heavy.split(",") if h] if name in heavy_families else []
            if "optmerge_full" in heavy:
                bench.mergelab(fam, "full", "optmerge", {"variant": "full"}, "auto")
            if "swudi" in heavy:
                bench.mergelab(fam, "full", "swudi", {}, "auto")
            bench.floor(fam, "lora")
            for m, p in (("task_arithmetic", {"lam": 1.0}), ("ties", {"lam": 1.0, "density": 0.2})):
                bench.mergelab(fam, "lora", m, p, [])
            if "optmerge_lora" in heavy:
                bench.mergelab(fam, "lora", "optmerge", {"variant": "lora"}, "auto")
        if bench.rows:
            print_table(bench.rows, fams, args.experts)
        checks = targets(bench.rows, fams, args.experts) if args.device == "cpu" else []
        print_targets(checks)
        cross = cross_check(fams, root, [m for m in args.cross_methods.split(",") if m]) if args.cross_check else []
        if args.json_out:
            args.json_out.write_text(json.dumps({
                "machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()},
                "families": fams, "rows": bench.rows, "targets": [list(c) for c in checks], "cross_check": cross,
            }, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_merge":
        child_merge(sys.argv[2])
    else:
        main()
