"""Shared fixtures: tiny checkpoints written in the test session (never downloaded).

* ``tiny_checkpoint``: random tensors in 2 safetensors shards + an index (mergekit's ``make_picollama`` idea without
  transformers), plus ``config.json`` and a tokenizer-like side file.
* ``tiny_models``: a factory building tiny real ``transformers`` models (``llama``, ``qwen2_vl``, ``llava``; configs
  from spec/ecosystem.md section 5) and saving a base plus perturbed full fine-tuned experts with
  ``save_pretrained`` (legacy on-disk names).
* ``device``: cpu, and cuda when present.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# The store templates and the content-hash cache live under $XDG_CACHE_HOME/mergelab: the test session (and every
# command it starts) gets its own, so a test run neither writes into the user's ~/.cache nor reads their entries.
_TEST_CACHE = tempfile.mkdtemp(prefix="mergelab-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, True)


# Nothing a test does may write a store into the repository root (MLflow's default URI is sqlite:///<cwd>/mlflow.db:
# a test that leaves it in the environment sends every later store there).
_ROOT_LEFTOVERS = ("mlflow.db", ".mlflow-init.lock", "optuna.db", "mlruns/mlflow.db")
_ROOT = Path(__file__).resolve().parents[1]
_PRESENT = {p for p in _ROOT_LEFTOVERS if (_ROOT / p).exists()}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    new = [p for p in _ROOT_LEFTOVERS if p not in _PRESENT and (_ROOT / p).exists()]
    if new:
        print(f"\nFAILED: the test session wrote {new} into the repository root {_ROOT}")
        session.exitstatus = 1


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int = 2) -> Path:
    """Write ``tensors`` as ``n_shards`` safetensors shards plus ``model.safetensors.index.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i * per : (i + 1) * per]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return directory


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped random state dict (on-disk names), float32."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g)
        sd[p + "self_attn.q_proj.bias"] = torch.randn(16, generator=g)
        sd[p + "mlp.up_proj.weight"] = torch.randn(24, 16, generator=g)
        sd[p + "input_layernorm.weight"] = torch.ones(16)
    sd["model.norm.weight"] = torch.ones(16)
    sd["lm_head.weight"] = torch.randn(32, 16, generator=g)
    return sd


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A 2-shard random checkpoint with ``config.json`` (model_type llama) and a tokenizer side file."""
    d = write_sharded(tmp_path / "base", tiny_state(0))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return d


# ----------------------------------------------------------------------------------------------------------------
# Tiny real transformers models

_T = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=512,
)


def build_tiny_model(kind: str, seed: int = 0) -> Any:
    """A randomly initialised tiny ``transformers`` model: ``llama``, ``qwen2_vl`` or ``llava``."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**_T, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(
                **_T,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2,
            ),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        )
        return transformers.Qwen2VLForConditionalGeneration(cfg)
    if kind == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                patch_size=16, projection_dim=32,
            ),
            text_config=transformers.LlamaConfig(**_T, num_key_value_heads=4),
            image_token_index=120, image_seq_length=16, vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        return transformers.LlavaForConditionalGeneration(cfg)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def save_model_family(root: Path, kind: str, n_experts: int = 2, scale: float = 0.02) -> tuple[Path, list[Path]]:
    """Save a tiny base and ``n_experts`` full fine-tuned experts (every parameter perturbed, vision included)."""
    model = build_tiny_model(kind)
    base_dir = root / f"{kind}-base"
    model.save_pretrained(base_dir)
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (base_dir / "chat_template.jinja").write_text("{{ messages }}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = []
    for i in range(n_experts):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(state[k] + scale * torch.randn(p.shape, generator=g))
        d = root / f"{kind}-expert{i}"
        model.save_pretrained(d)
        experts.append(d)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(state[k])
    return base_dir, experts


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, list[Path]]]:
    """Factory: ``tiny_models(kind) -> (base_dir, [expert_dir, ...])``, built once per session and kind."""
    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(kind: str) -> tuple[Path, list[Path]]:
        if kind not in cache:
            cache[kind] = save_model_family(tmp_path_factory.mktemp(kind), kind)
        return cache[kind]

    return get



@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline benchmark's tiny zoo (base, 5 full + 5 LoRA experts, mixture; seconds), built once per session.

    Read-only for the tests that use it: merges write to their own run directories.
    """
    from mergelab.bench.zoo_build import build_zoo

    root = tmp_path_factory.mktemp("tiny-zoo") / "zoo"
    build_zoo(root, tiny=True, progress=False, evaluate=False, device="cpu")
    return root


from conftest_platform import _isolated_mlruns, mlflow_template, platform_store  # noqa: E402,F401  (platform fixtures)


@pytest.fixture(autouse=True)
def _no_pending_stop():  # noqa: ANN202
    """A stop request (SIGTERM/SIGINT recorded by mergelab._signals) that a test sent never leaks into the next."""
    from mergelab import _signals

    _signals.clear()
    yield
    _signals.clear()
