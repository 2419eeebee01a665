"""The offline benchmark's tiny Qwen2-VL: chat-template prompts, training batches, training, the tiny zoo."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers

from mergelab import hf
from mergelab.bench import modeling, train, zoo_build, zoo_plan, zoo_table
from mergelab.bench.tasks import generate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vqa() -> dict[str, list]:
    return {"train": generate("vqa", "shifted", "train", n=160), "test": generate("vqa", "shifted", "test", n=60)}


@pytest.fixture(scope="module")
def processor(vqa) -> transformers.ProcessorMixin:
    tok = modeling.build_tokenizer(modeling.corpus_lines(vqa["train"]), vocab_size=400)
    return modeling.build_processor(tok)


def test_chat_template_prompt_is_what_the_runner_uses(processor) -> None:
    from mergelab.evaluators.runner import build_prompt as runner_prompt

    q = "what color is the circle?"
    prompt = modeling.build_prompt(processor, q)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>what color is the circle?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert runner_prompt(processor, q, with_image=True, model_type="qwen2_vl") == prompt
    ids, n = modeling.training_ids(processor, q, "pink")
    tok = processor.tokenizer
    assert ids[:n] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[n:]) == "pink<|im_end|>" and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids).count("<|image_pad|>") == 1


def test_collate_masks_prompt_and_matches_processor(processor, vqa) -> None:
    enc = train.encode(vqa["train"][:4], processor)
    batch = train.collate(enc, [0, 1, 2, 3], processor)
    ref = processor(text=[modeling.build_prompt(processor, s.question) for s in vqa["train"][:4]],
                    images=[s.image for s in vqa["train"][:4]], return_tensors="pt", padding=True)
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(batch["image_grid_thw"], ref["image_grid_thw"])
    tok = processor.tokenizer
    for r, s in enumerate(vqa["train"][:4]):
        width = int(ref["attention_mask"][r].sum())
        assert torch.equal(batch["input_ids"][r, :width], ref["input_ids"][r][ref["attention_mask"][r].bool()])
        assert int((batch["input_ids"][r] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 16
        target = batch["labels"][r][batch["labels"][r] != -100]
        assert tok.decode(target) == s.answer + "<|im_end|>"
    assert torch.equal(batch["mm_token_type_ids"][:, : ref["mm_token_type_ids"].shape[1]].bool().sum(),
                       ref["mm_token_type_ids"].bool().sum())


def test_collate_positions_are_get_rope_index_and_change_no_loss(processor, vqa) -> None:
    """The batch's precomputed M-RoPE positions are exactly Qwen2-VL's own (padding included), so the loss with
    them equals the loss the model computes when it derives them itself."""
    enc = train.encode(vqa["train"][:6], processor)
    batch = train.collate(enc, [0, 3, 1, 5, 2, 4], processor)
    model = modeling.build_model(processor.tokenizer, modeling.TinyQwen2VLConfig.tiny(), seed=0).eval()
    ref, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"])
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # padding is exercised
    assert torch.equal(batch["position_ids"], ref)
    with torch.no_grad():
        own = model(**{k: v for k, v in batch.items() if k != "position_ids"}).loss
        given = model(**batch).loss
    assert torch.equal(own, given)


def test_trained_expert_beats_untrained_base(processor, vqa, tmp_path: Path) -> None:
    from mergelab.bench.data import ensure_data
    from mergelab.evaluators import evaluate

    root = ensure_data(tmp_path / "data", tasks=["vqa"], variants=["shifted"], splits=["test"], sizes={"test": 60})

    def score(m: transformers.PreTrainedModel) -> float:
        return evaluate(m, processor, tasks=["vqa"], split="test", data_root=root).scores["vqa"]

    model = modeling.build_model(processor.tokenizer, modeling.TinyQwen2VLConfig.tiny(), seed=0)
    before = score(model)
    cfg = train.TrainConfig(steps=80, batch_size=16, lr=3e-3, warmup_steps=4, seed=0)
    res = train.train(model, processor, train.encode(vqa["train"], processor), cfg, device="cpu")
    after = score(res.model)
    assert res.losses[-1] < 0.6 * res.losses[0]
    assert after >= before + 15, (before, after)


def test_training_is_deterministic_and_lora_touches_only_the_language_model(processor, vqa) -> None:
    enc = train.encode(vqa["train"][:32], processor)
    runs = []
    for _ in range(2):
        model = modeling.build_model(processor.tokenizer, modeling.TinyQwen2VLConfig.tiny(), seed=1)
        cfg = train.TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, lora_r=4, lora_alpha=8, seed=5)
        runs.append(train.train(model, processor, enc, cfg, device="cpu"))
    assert runs[0].losses == runs[1].losses
    assert float(torch.tensor([1e-39]) * 0.5) > 0  # training flushed denormals to zero and switched it back off
    names = [n for n, _ in runs[0].model.named_parameters() if "lora_" in n]
    assert names and all(".language_model.layers." in n for n in names)
    assert runs[0].trainable_params == sum(p.numel() for n, p in runs[0].model.named_parameters() if "lora_" in n)


def test_lr_scale_slows_the_matching_parameters_only(processor, vqa) -> None:
    """A parameter matched by ``lr_scale`` with factor 0 never moves; the others train at the full lr."""
    enc = train.encode(vqa["train"][:16], processor)
    model = modeling.build_model(processor.tokenizer, modeling.TinyQwen2VLConfig.tiny(), seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = train.TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1, lr_scale=((r"model\.visual\.", 0.0),))
    trained = train.train(model, processor, enc, cfg, device="cpu").model
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not any(n.startswith("model.visual.") for n in moved)
    assert any(n.startswith("model.language_model.layers.") for n in moved)
    assert "lr_scale" not in train.TrainConfig().to_dict()  # zoo fingerprints of older configs are unchanged
    assert cfg.to_dict()["lr_scale"] == [[r"model\.visual\.", 0.0]]


def test_tiny_zoo_builds_in_seconds_reuses_and_reloads(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    manifest = zoo_build.build_zoo(tmp_path / "zoo", tiny=True, progress=False, evaluate=False)
    first = time.perf_counter() - t0
    names = {"seed0/base", "seed0/mixture", *zoo_plan.expert_names(0, "full"), *zoo_plan.expert_names(0, "lora")}
    assert set(manifest["models"]) == names
    for name, entry in manifest["models"].items():
        d = tmp_path / "zoo" / name
        (wname, sha), = entry["weights"].items()
        assert zoo_build.sha256_file(d / wname) == sha
        assert entry["train_seconds"] >= 0 and entry["fingerprint"]
    assert json.loads((tmp_path / "zoo" / "manifest.json").read_text())["models"].keys() == names

    assert manifest["build_env"]["device"] == "cpu"  # the resolved device, not "auto"
    written = (tmp_path / "zoo" / "manifest.json").read_bytes()
    logs: list[str] = []
    t0 = time.perf_counter()
    again = zoo_build.build_zoo(tmp_path / "zoo", tiny=True, progress=False, evaluate=False, log=logs.append)
    assert time.perf_counter() - t0 < first / 2
    assert sorted(logs) == sorted(f"{n}: reused" for n in names)
    assert again["models"] == manifest["models"]
    assert (tmp_path / "zoo" / "manifest.json").read_bytes() == written  # reusing everything rewrites nothing

    lora_dir = tmp_path / "zoo" / "seed0" / "lora" / "ocr"
    assert (lora_dir / "adapter_model.safetensors").is_file() and not (lora_dir / "config.json").exists()
    assert json.loads((lora_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../base"
    assert "base_model: ../../base\n" in (lora_dir / "README.md").read_text()  # no build path in the card
    model, proc = hf.load_model(lora_dir)
    base, _ = hf.load_model(tmp_path / "zoo" / "seed0" / "base")
    diff = {k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert diff and all(".language_model.layers." in k for k in diff)
    full, _ = hf.load_model(tmp_path / "zoo" / "seed0" / "full" / "vqa")
    diff = {k for k, v in full.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert diff and all(k.startswith("model.language_model.layers.") for k in diff)  # vision, embeddings frozen
    answers = train.greedy_answers(model, proc, generate("ocr", "shifted", "test", n=4), max_new_tokens=3)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_zoo_built_by_two_worker_processes_is_the_same_zoo(tmp_path: Path) -> None:
    """``jobs=2`` trains the experts and the mixture in spawned workers: same weights, same manifest entries."""
    one = zoo_build.build_zoo(tmp_path / "one", tiny=True, progress=False, evaluate=False)
    logs: list[str] = []
    two = zoo_build.build_zoo(tmp_path / "two", tiny=True, progress=False, evaluate=False, jobs=2, log=logs.append)
    assert any("in 2 processes" in line for line in logs)
    assert sorted(two["models"]) == sorted(one["models"])
    for name, entry in one["models"].items():
        assert two["models"][name]["weights"] == entry["weights"], name
        assert two["models"][name]["fingerprint"] == entry["fingerprint"], name
    again = zoo_build.build_zoo(tmp_path / "two", tiny=True, progress=False, evaluate=False, jobs=2)
    assert again["models"] == two["models"]  # reused, nothing retrained
    with pytest.raises(ValueError, match="jobs"):
        zoo_build.build_zoo(tmp_path / "two", tiny=True, progress=False, evaluate=False, jobs=0)
    with pytest.raises(ValueError, match="device: unknown device 'tpu0'"):  # checked before anything is written
        zoo_build.build_zoo(tmp_path / "three", tiny=True, progress=False, evaluate=False, device="tpu0")
    assert not (tmp_path / "three").exists()


_LONG_BUILD = """
import sys
from dataclasses import replace

import torch

torch.set_num_threads(2)
from mergelab.bench import zoo_build, zoo_plan
from mergelab.platform.cli import raise_on_sigterm

raise_on_sigterm()  # what every `mergelab` command does
plan = zoo_plan.ZooPlan.tiny()
plan = replace(plan, full=replace(plan.full, steps=10**6), lora=replace(plan.lora, steps=10**6))
zoo_build.build_zoo(sys.argv[1], plan=plan, progress=False, evaluate=False, jobs=2, log=lambda m: print(m, flush=True))
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_build_leaves_no_worker_behind(tmp_path: Path, sig: str) -> None:
    """``build_zoo(jobs=2)`` stopped while its workers train jobs that would run for hours: after SIGKILL (no
    cleanup runs in the parent) each worker sees its parent gone and exits, instead of training on and then
    waiting on the pool's queue forever; after SIGTERM (raised as an interrupt by the CLI's handler) the parent
    terminates its workers and exits at once, its manifest intact."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    import psutil

    root = tmp_path / "zoo"
    proc = subprocess.Popen([sys.executable, "-c", _LONG_BUILD, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    children: list = []
    try:
        for line in proc.stdout:  # the base trains in the parent first, then the workers start
            if "in 2 processes" in line:
                break
        else:
            pytest.fail(f"the build ended before starting its workers (rc {proc.wait()}): {proc.stderr.read()}")
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = parent.children(recursive=True)
            if sum("spawn_main" in " ".join(c.cmdline()) for c in children) == 2:
                break
            time.sleep(0.2)
        assert sum("spawn_main" in " ".join(c.cmdline()) for c in children) == 2, "no two workers started"
        time.sleep(2)  # let them get into their jobs
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"processes outlived the stopped build: {[c.pid for c in alive]}"
        assert rc != 0
        if sig == "SIGTERM":
            assert "Terminated: signal SIGTERM" in proc.stderr.read()
            assert list(zoo_plan.read_manifest(root)["models"]) == ["seed0/base"]  # what finished, intact
    finally:  # a failing run must not leave its orphans training on the test machine
        if proc.poll() is None:
            proc.kill()
        for c in children:
            with contextlib.suppress(psutil.Error):
                c.kill()


def test_combine_zoos_joins_parts_built_apart(tmp_path: Path) -> None:
    """Zoos built in parallel roots (split by kind) combine into one; an entry rescored in a source replaces the
    destination's even when the weights are the same."""
    a = zoo_build.build_zoo(tmp_path / "a", tiny=True, progress=False, evaluate=False, kinds=("full",))
    b = zoo_build.build_zoo(tmp_path / "b", tiny=True, progress=False, evaluate=False, kinds=("lora", "mixture"))
    assert a["models"]["seed0/base"]["weights"] == b["models"]["seed0/base"]["weights"]
    b["models"]["seed0/base"]["scores"] = {"shifted": {"average": 1.0}}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(b))
    combined = zoo_build.combine_zoos(tmp_path / "a", [tmp_path / "b"])
    assert set(combined["models"]) == set(a["models"]) | set(b["models"])
    assert combined["models"]["seed0/base"]["scores"] == {"shifted": {"average": 1.0}}
    for name, entry in combined["models"].items():
        (wname, sha), = entry["weights"].items()
        assert zoo_build.sha256_file(tmp_path / "a" / name / wname) == sha, name
    # a source made by copying a zoo and building another seed in it leaves the copied seed's models alone
    stale = json.loads((tmp_path / "b" / "manifest.json").read_text())
    stale["plan"]["seeds"] = [1]
    stale["models"]["seed0/base"]["scores"] = {"stale": True}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(stale))
    assert zoo_build.combine_zoos(tmp_path / "a", [tmp_path / "b"])["models"] == combined["models"]
    # nor does a stale copy of a model that the destination retrained since (older trained_at)
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "c")
    stale = json.loads((tmp_path / "c" / "manifest.json").read_text())
    mine = combined["models"]["seed0/full/vqa"]
    assert mine["trained_at"]
    stale["models"]["seed0/full/vqa"].update(weights={"model.safetensors": "0" * 64},
                                             trained_at="2000-01-01T00:00:00Z")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(stale))
    assert zoo_build.combine_zoos(tmp_path / "a", [tmp_path / "c"])["models"]["seed0/full/vqa"] == mine
    stale["models"]["seed0/full/vqa"]["trained_at"] = "2999-01-01T00:00:00Z"  # newer: it replaces the entry
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(stale))
    newer = zoo_build.combine_zoos(tmp_path / "a", [tmp_path / "c"])["models"]["seed0/full/vqa"]
    assert newer["trained_at"] == "2999-01-01T00:00:00Z"
    with pytest.raises(ValueError, match="plan differs"):
        other = json.loads((tmp_path / "b" / "manifest.json").read_text())
        other["plan"]["n_train"] += 1
        (tmp_path / "b" / "manifest.json").write_text(json.dumps(other))
        zoo_build.combine_zoos(tmp_path / "a", [tmp_path / "b"])


def test_replay_mixes_the_base_data_into_an_experts_training_set(processor) -> None:
    """``ZooPlan.lora_replay`` draws that share of a LoRA expert's samples from every task's generic data (equal
    parts); it is left out of the plan and the fingerprints when off, so zoos built before it stay valid."""
    from dataclasses import replace

    plan = replace(zoo_plan.ZooPlan.tiny(), n_train=30, lora_replay=0.2)
    data = zoo_plan.ZooData(plan, ("vqa", "ocr"))
    assert zoo_plan.expert_data(data, "vqa", 0.0, processor) is data.encoded("vqa", "shifted", processor)
    mixed = zoo_plan.expert_data(data, "vqa", plan.replay("lora"), processor)
    assert len(mixed) == 90
    w = mixed.weights / mixed.weights.sum()
    own, generic_vqa, generic_ocr = w[:30].sum(), w[30:60].sum(), w[60:].sum()
    assert own == pytest.approx(0.8) and generic_vqa == pytest.approx(0.1) and generic_ocr == pytest.approx(0.1)
    assert mixed.ids[30:60] == data.encoded("vqa", "generic", processor).ids
    assert plan.replay("full") == 0.0 and "full_replay" not in plan.to_dict()
    assert plan.to_dict()["lora_replay"] == 0.2 and "lora_replay" not in zoo_plan.ZooPlan().to_dict()
    with pytest.raises(ValueError, match="lora_replay"):
        zoo_plan.ZooPlan(lora_replay=1.0)


def test_replay_with_base_targets_trains_the_replayed_prompts_on_the_bases_own_answers() -> None:
    """``replay_targets="base"`` (self-distillation) labels the first ``replay_items`` generic prompts per task with
    the base's greedy answers, special tokens such as the box markers kept; it enters the plan and the fingerprints
    only when replay is on and the targets are not the data's. Uses the shipped zoo's seed-0 base: a trained
    generalist that answers (a seconds-trained tiny base mostly answers nothing)."""
    from dataclasses import replace

    if not (zoo_plan.DEFAULT_ZOO / "seed0" / "base").is_dir():
        pytest.skip("the shipped zoo is not in this checkout")
    base, proc = hf.load_model(zoo_plan.DEFAULT_ZOO / "seed0" / "base")
    plan = replace(zoo_plan.ZooPlan.tiny(), n_train=30, lora_replay=0.2, replay_targets="base", replay_items=6)
    data = zoo_plan.ZooData(plan, ("vqa", "grounding"))
    with pytest.raises(ValueError, match="needs the base model"):
        zoo_plan.expert_data(data, "vqa", 0.2, proc)
    mixed = zoo_plan.expert_data(data, "vqa", 0.2, proc, base=base)
    prompts = data.raw("grounding", "generic")[:6]
    answers = train.greedy_answers(base, proc, prompts, max_new_tokens=24, keep_special=True)
    labelled = [replace(s, answer=a) for s, a in zip(prompts, answers, strict=True) if a]
    assert labelled and mixed.ids[-len(labelled):] == train.encode(labelled, proc).ids
    assert len(mixed) == 30 + sum(1 for a in train.greedy_answers(base, proc, data.raw("vqa", "generic")[:6],
                                                                  max_new_tokens=24, keep_special=True) if a) + len(labelled)
    w = mixed.weights / mixed.weights.sum()
    assert float(w[:30].sum()) == pytest.approx(0.8)
    assert sum("<|box_start|>" in s.answer for s in labelled) >= len(labelled) // 2  # the box format is trained, kept
    plain = train.greedy_answers(base, proc, prompts, max_new_tokens=24)
    assert [a.replace("<|box_start|>", "").replace("<|box_end|>", "").strip() for a in answers] == plain
    assert plan.to_dict()["replay_targets"] == "base" and "replay_targets" not in zoo_plan.ZooPlan().to_dict()
    assert "replay_targets" not in replace(plan, lora_replay=0.0).to_dict()
    with pytest.raises(ValueError, match="replay_targets"):
        zoo_plan.ZooPlan(replay_targets="teacher")
    fps = {j.name: j.fingerprint for j in zoo_plan.seed_jobs(plan, data.tasks, 0, "sha", kinds=("lora",))}
    other = replace(plan, replay_targets="data")
    assert all(j.fingerprint != fps[j.name] for j in zoo_plan.seed_jobs(other, data.tasks, 0, "sha", kinds=("lora",)))


def test_replay_retrains_only_the_experts_it_changes(tmp_path: Path) -> None:
    from dataclasses import replace

    kw = dict(progress=False, evaluate=False, kinds=("full", "lora"))
    before = zoo_build.build_zoo(tmp_path / "zoo", plan=zoo_plan.ZooPlan.tiny(), **kw)
    logs: list[str] = []
    after = zoo_build.build_zoo(tmp_path / "zoo", plan=replace(zoo_plan.ZooPlan.tiny(), lora_replay=0.5), log=logs.append,
                          **kw)
    reused = {line.split(":")[0] for line in logs if line.endswith(": reused")}
    assert reused == {"seed0/base", *zoo_plan.expert_names(0, "full")}
    for name in zoo_plan.expert_names(0, "lora"):
        assert after["models"][name]["weights"] != before["models"][name]["weights"], name


def test_shipped_zoo_fingerprints_are_the_plans() -> None:
    """Every fingerprint of the shipped manifest (tokenizer, bases, experts, mixtures) recomputed from the default
    plan: what the zoo is made of has not changed, so its models and hashes are still the plan's."""
    manifest = zoo_plan.read_manifest(zoo_plan.DEFAULT_ZOO)
    plan = zoo_plan.ZooPlan()
    assert zoo_plan.plan_fingerprints(plan, manifest) == {n: e["fingerprint"] for n, e in manifest["models"].items()}
    corpus = zoo_plan.ZooData(plan, manifest["tasks"]).corpus()
    assert zoo_plan.tokenizer_fingerprint(plan, corpus) == manifest["tokenizer"]["fingerprint"]


def test_shipped_zoo_is_complete_and_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo in the package holds every model of the default plan, hashes as its manifest says, and a default
    ``mergelab bench build`` reuses all of it (a plan or code change without a rebuild fails here, not in the demo)."""
    import shutil

    manifest = zoo_plan.read_manifest(zoo_plan.DEFAULT_ZOO)
    plan = zoo_plan.ZooPlan()
    assert manifest["plan"] == plan.to_dict()
    for seed in plan.seeds:
        names = [f"seed{seed}/base", f"seed{seed}/mixture"] + [
            n for kind in ("full", "lora") for n in zoo_plan.expert_names(seed, kind)]
        for name in names:
            entry = manifest["models"][name]
            wf = zoo_plan.weights_file(zoo_plan.DEFAULT_ZOO / name)
            assert entry["weights"][wf.name] == zoo_build.sha256_file(wf), name
            assert entry["scores_limit"] == plan.n_eval and set(entry["scores"]) == {"shifted", "generic"}, name
    copy = tmp_path / "zoo"
    shutil.copytree(zoo_plan.DEFAULT_ZOO, copy)

    def no_training(*_a, **_k):
        raise AssertionError("the shipped zoo is stale: `mergelab bench build` would retrain a model")

    monkeypatch.setattr(zoo_build, "train", no_training)
    built = zoo_build.build_zoo(copy, progress=False, evaluate=False)
    assert sorted(built["models"]) == sorted(manifest["models"])


@pytest.mark.parametrize("lora", [False, True])
def test_cached_image_features_train_like_the_pixel_path(processor, vqa, lora: bool) -> None:
    """A run with a frozen vision tower encodes each image once; its losses equal re-encoding every step."""
    enc = train.encode(vqa["train"][:24], processor)
    cfg = train.TrainConfig(steps=4, batch_size=8, lr=2e-3, warmup_steps=1, seed=3,
                            lora_r=4 if lora else 0, lora_alpha=8, trainable=None if lora else train.LANGUAGE_MODEL)
    runs = {}
    for cached in (True, False):
        model = modeling.build_model(processor.tokenizer, modeling.TinyQwen2VLConfig.tiny(), seed=4)
        runs[cached] = train.train(model, processor, enc, cfg, device="cpu", cache_images=cached)
    assert train.vision_is_frozen(runs[True].model)
    torch.testing.assert_close(runs[True].losses, runs[False].losses, rtol=1e-5, atol=1e-6)
    feats = train.image_features(runs[True].model, processor, enc.images[:3])
    assert feats.shape == (3, 16, 64)


def test_examples_sharing_an_image_store_and_encode_it_once(processor, vqa) -> None:
    """Text-only items share one blank image object: ``encode`` keeps one row for it, ``concat`` offsets the rows,
    and training on the shared rows (cached features or pixels) is training on one image per example."""
    from mergelab.bench import lexicon

    described = lexicon.described_items(vqa["train"][:20])
    shared = train.encode(described, processor)
    assert shared.images.shape[0] == 1 and shared.index().tolist() == [0] * 20
    plain = train.encode(vqa["train"][:12], processor)
    assert plain.image_index.numel() == 0 and plain.index().tolist() == list(range(12))
    both = train.concat([(plain, 1.0), (shared, 1.0)])
    assert both.images.shape[0] == 13 and both.index().tolist() == list(range(12)) + [12] * 20
    one_each = train.concat([(plain, 1.0), (plain, 1.0)])
    assert one_each.image_index.numel() == 0 and one_each.images.shape[0] == 24
    copies = train.Encoded(both.ids, both.n_prompt, both.images[both.index()], both.weights)  # one image each
    idx = [0, 11, 12, 31, 5, 20]
    torch.testing.assert_close(train.collate(both, idx, processor), train.collate(copies, idx, processor), rtol=0, atol=0)
    cfg = train.TrainConfig(steps=3, batch_size=8, lr=2e-3, warmup_steps=1, seed=5, trainable=train.LANGUAGE_MODEL)
    losses = {}
    for name, enc, cached in (("shared", both, True), ("copies", copies, True), ("pixels", both, False)):
        model = modeling.build_model(processor.tokenizer, modeling.TinyQwen2VLConfig.tiny(), seed=4)
        losses[name] = train.train(model, processor, enc, cfg, device="cpu", cache_images=cached).losses
    torch.testing.assert_close(losses["shared"], losses["copies"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["shared"], losses["pixels"], rtol=1e-5, atol=1e-6)


def test_combine_results_joins_runs_split_by_seed_and_setting() -> None:
    def run(seed: int, setting: str, avg: float) -> dict:
        scores = {"shifted": {"vqa": avg, "average": avg}, "generic": {"vqa": avg, "average": avg}}
        return {"tasks": ["vqa"], "seeds": [seed],
                "rows": {setting: {"base": {str(seed): scores}, "merge:ties": {str(seed): scores}}},
                "lam": {setting: {"ties": {str(seed): 0.5}}}, "timing": {}}

    joined = zoo_table.combine_results([run(0, "full", 10.0), run(1, "full", 20.0), run(0, "lora", 30.0)])
    assert joined["seeds"] == [0, 1] and sorted(joined["rows"]) == ["full", "lora"]
    assert zoo_table.aggregate(joined, "full")["base"]["average"][0] == pytest.approx(15.0)
    assert joined["lam"]["full"]["ties"] == {"0": 0.5, "1": 0.5}
    assert "mean +- sd over 2 seed(s)" in zoo_table.format_table(joined, "full")
    with pytest.raises(ValueError, match="full/base seed 0 appears twice"):
        zoo_table.combine_results([run(0, "full", 1.0), run(0, "full", 2.0)])
    with pytest.raises(ValueError, match="tasks"):
        zoo_table.combine_results([run(0, "full", 1.0), {**run(1, "full", 1.0), "tasks": ["ocr"]}])


def test_bench_build_cli_takes_jobs(tmp_path: Path) -> None:
    """``mergelab bench build --jobs 2`` builds the whole tiny zoo in worker processes; ``--jobs 0`` is refused."""
    from click.testing import CliRunner

    from mergelab.platform.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["bench", "build", "--zoo", str(tmp_path / "z"), "--tiny", "--no-eval", "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "in 2 processes" in res.output and "zoo: 12 models" in res.output
    bad = runner.invoke(main, ["bench", "build", "--zoo", str(tmp_path / "z"), "--tiny", "--jobs", "0"])
    assert bad.exit_code == 2 and "--jobs" in bad.output


def test_check_targets_counts_a_target_met_exactly() -> None:
    """Means over three seeds of half-point scores: a merge keeping exactly half of a gain (91 of 182 points) passes,
    half a point less fails (the plain float comparison put 0.49999999999999994 below 0.5)."""
    tasks = list(zoo_plan.TASKS)

    def row(per_seed: list[dict[str, float]]) -> dict[str, dict]:
        out = {}
        for seed, vals in enumerate(per_seed):
            cells = {t: float(vals.get(t, 0.0)) for t in tasks}
            out[str(seed)] = {"shifted": {**cells, "average": sum(cells.values()) / len(cells)}}
        return out

    rows = {"base": row([{"vqa": 16.5}, {"vqa": 16.5}, {"vqa": 17.5}]),
            "expert:vqa": row([{"vqa": 78}, {"vqa": 78}, {"vqa": 76.5}]),
            **{f"expert:{t}": row([{t: 40}] * 3) for t in tasks[1:]},
            "merge:a": row([{"vqa": 65, "geometry": 20, "chart": 20}, {"vqa": 26, "geometry": 20, "chart": 20},
                            {"vqa": 50.5, "geometry": 20, "chart": 20}]),
            "merge:b": row([{}] * 3)}
    result = {"tasks": tasks, "seeds": [0, 1, 2], "rows": {"lora": rows}, "lam": {"lora": {}}}
    checks = {name: (ok, detail) for name, ok, detail in zoo_table.check_targets(result, "lora")}
    keep = checks["best merge keeps >= half of the own-task gain on >= 3 of 5 tasks"]
    assert keep == (True, "vqa 50% geometry 50% chart 50% ocr 0% grounding 0%")
    assert all(ok for ok, _ in checks.values()), checks
    rows["merge:a"]["0"]["shifted"]["vqa"] -= 0.5
    checks = {name: ok for name, ok, _ in zoo_table.check_targets(result, "lora")}
    assert not checks["best merge keeps >= half of the own-task gain on >= 3 of 5 tasks"]


def test_benchmark_scores_every_row_of_the_tiny_zoo(tiny_zoo: Path, tmp_path: Path) -> None:
    """``benchmark`` (what `mergelab bench table` and benchmarks/offline_benchmark.py print): base, experts, mixture
    and each method at the val-chosen lambda, both variants, per seed; then the table, the targets and a join."""
    logs: list[str] = []
    res = zoo_table.benchmark(tiny_zoo, settings=("lora",), methods=("task_arithmetic", "ties"), lams=(0.5, 1.0),
                        val_limit=4, test_limit=6, data_root=tmp_path / "data", data_sizes={"val": 6, "test": 6},
                        work_dir=tmp_path / "work", log=logs.append)
    rows = res["rows"]["lora"]
    experts = [f"expert:{t}" for t in zoo_plan.TASKS]
    assert set(rows) == {"base", "mixture", *experts, "merge:task_arithmetic", "merge:ties"}
    for row, per_seed in rows.items():
        assert set(per_seed) == {0}, row
        for variant in ("shifted", "generic"):
            cells = per_seed[0][variant]
            assert set(cells) == {*zoo_plan.TASKS, "average"} and all(0 <= v <= 100 for v in cells.values()), row
            assert cells["average"] == pytest.approx(sum(cells[t] for t in zoo_plan.TASKS) / 5, abs=0.01)
    assert {m: lam[0] in (0.5, 1.0) for m, lam in res["lam"]["lora"].items()} == {"task_arithmetic": True,
                                                                                "ties": True}
    assert len(logs) == 2 and all("lora seed0" in line for line in logs)
    assert not any((tmp_path / "work").iterdir())  # merged checkpoints are removed once scored
    table = zoo_table.format_table(res, "lora")
    assert "merge:ties (lam" in table and "mean +- sd over 1 seed(s)" in table
    assert [name for name, _, _ in zoo_table.check_targets(res, "lora")][0].startswith("each expert beats the base")
    joined = zoo_table.combine_results([json.loads(json.dumps(res))])
    assert joined["rows"]["lora"]["base"]["0"] == rows["base"][0]
    assert joined["limits"] == {"val": 4, "test": 6}
    timing = res["timing"]["lora"]["ties"][0]
    assert timing["eval_s"] > 0 and timing["generic_eval_s"] > 0  # the five tasks and the forgetting part, apart
    assert "of the five tasks (6 items each)" in zoo_table.slowest_merge(res, "lora")
    # a seed written before the two parts were timed apart counts in the combined time only
    mixed = {**res, "timing": {"lora": {"ties": {0: timing, 1: {"merge_s": 1.0, "test_eval_s": 1e3}}}}}
    line = zoo_table.slowest_merge(mixed, "lora")
    assert "of the 1 of 2 runs timed apart" in line and line.endswith("forgetting table: 1001.0 s (ties)")
    with pytest.raises(ValueError, match="limits"):
        zoo_table.combine_results([res, {**res, "limits": {"val": 4, "test": None}}])
