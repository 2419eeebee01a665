"""Faults in merges and campaigns (the fast cases of benchmarks/faults.py): nothing of a failed or stopped run stays
on disk or in the registry wherever the failure happens, a stop request (SIGTERM/SIGINT) is never lost and ends the
runs KILLED, and a campaign ends with exactly its budget of complete trials whatever workers die."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import write_sharded
from conftest_platform import WeightEvaluator, make_expert_family, tiny_campaign

from mergelab import _signals
from mergelab.engine import MergeRecipe, run_merge
from mergelab.platform import registry as reg
from mergelab.platform.campaign import RUN_ATTR, run_campaign
from mergelab.platform.campaign_config import CampaignConfig
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.store import Store, local_path

TASKS = ["vqa", "geometry", "ocr"]


def _campaign(tmp_path: Path, **over: object) -> tuple[CampaignConfig, WeightEvaluator]:
    return tiny_campaign(tmp_path, **{"sampler": {"name": "random", "seed": 0}, "budget": {"n_trials": 2},
                                    "registry": {"name": "camp-model", "register": "all", "evaluate_test": True}, **over})


@pytest.fixture
def handlers():  # noqa: ANN201 - the CLI's stop handlers, restored afterwards
    prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert _signals.install()
    yield
    for s, h in prev.items():
        signal.signal(s, h)
    _signals.clear()


def _leftovers(store: Store, runs: list) -> list[str]:  # noqa: ANN001
    """Weights of runs that did not finish, and model versions of such runs."""
    client = store.client()
    bad = [f"{r.info.run_id} {r.info.status}: merged/" for r in runs
           if r.info.status != "FINISHED" and (local_path(r.info.artifact_uri) / "merged").exists()]
    for rm in client.search_registered_models():
        for v in client.search_model_versions(f"name = '{rm.name}'"):
            if client.get_run(v.run_id).info.status != "FINISHED":
                bad.append(f"{rm.name} v{v.version} of a {client.get_run(v.run_id).info.status} run")
    return bad


@pytest.mark.parametrize("fault", ["crash", "sigterm"])
def test_a_fault_during_the_test_evaluation_of_a_candidate_leaves_nothing(platform_store: Store, tmp_path: Path,
                                                                         fault: str, handlers: None) -> None:
    """The registry candidate's test evaluation runs after the tracked merge: a crash or a stop there used to leave
    the full merged weights of a FAILED/KILLED run."""
    cfg, ev = _campaign(tmp_path)

    def test_eval(model_dir, tasks, split, on_task):  # noqa: ANN001, ANN202
        assert split == "test"
        if fault == "crash":
            raise RuntimeError("test evaluator exploded")
        os.kill(os.getpid(), signal.SIGTERM)
        return ev(model_dir, tasks, split, on_task)

    if fault == "crash":
        res = run_campaign(cfg, store=platform_store, evaluator=ev, test_evaluator=test_eval)
        assert res.n_complete == 0 and res.n_failed == 2
    else:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            run_campaign(cfg, store=platform_store, evaluator=ev, test_evaluator=test_eval)
    client = platform_store.client()
    runs = client.search_runs([platform_store.experiment_id("mergelab", client)])
    trials = [r for r in runs if r.data.tags.get("mergelab.role") == "trial"]
    assert trials and all(r.info.status == ("FAILED" if fault == "crash" else "KILLED") for r in trials)
    assert _leftovers(platform_store, runs) == []
    parent = next(r for r in runs if r.data.tags.get("mergelab.role") == "campaign")
    assert parent.info.status == ("FINISHED" if fault == "crash" else "KILLED")  # never left RUNNING


def test_a_crash_after_registration_deletes_the_version_and_its_weights(platform_store: Store, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, ev = _campaign(tmp_path, budget={"n_trials": 1})
    real = reg.register_run

    def register_then_die(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        real(*a, **kw)
        raise ConnectionError("tracking server went away after registering")

    monkeypatch.setattr(reg, "register_run", register_then_die)
    res = run_campaign(cfg, store=platform_store, evaluator=ev)
    assert res.n_failed == 1
    client = platform_store.client()
    runs = client.search_runs([platform_store.experiment_id("mergelab", client)])
    assert _leftovers(platform_store, runs) == []
    assert client.search_model_versions("name = 'camp-model'") == []


def _wide_family(root: Path, layers: int = 24, dim: int = 128) -> tuple[Path, list[Path]]:
    """A Llama-named base of ``4 * layers + 4`` tensors and two full experts: a merge of a few tenths of a second with
    a hundred safe points, long against a timer thread's wake-up on a loaded machine (the 12-tensor family merges in
    7 ms, so most signals landed after it whatever the delay)."""
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(64, dim, generator=g)}
    for i in range(layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
            base[f"model.layers.{i}.{name}.weight"] = torch.randn(dim, dim, generator=g)
    base["model.norm.weight"] = torch.ones(dim)
    base["lm_head.weight"] = torch.randn(64, dim, generator=g)
    config = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    bdir = write_sharded(root / "base", base)
    (bdir / "config.json").write_text(config)
    experts = []
    for j in range(2):
        d = write_sharded(root / f"task{j}", {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                          n_shards=1)
        (d / "config.json").write_text(config)
        experts.append(d)
    return bdir, experts


def test_sigterm_at_random_points_of_merges_is_never_lost(tmp_path: Path, handlers: None) -> None:
    """SIGTERM at 15 random moments of a merge (reader thread, method, writer, GC, finally blocks): every time it
    ends the merge with Terminated and no output, or, when it came after the last safe point, stays pending for the
    caller (the CLI acts on it before exiting). Raising from the handler lost about 2 in 7.

    The delays are drawn over the duration of a warm merge (the fastest seen so far: the first merge of a process
    is the slowest, and a merge that ran faster than the estimate shortens it), so that most signals land inside a
    merge at any load; at least 3 of 15 must have stopped one."""
    base, experts = _wide_family(tmp_path / "zoo")
    recipe = MergeRecipe.build(base=base, experts=experts, method="ties", params={"density": 0.5}, policy="llama",
                               device="cpu")
    took = float("inf")
    for i in range(2):  # warm-up, then a warm merge
        t0 = time.perf_counter()
        run_merge(recipe, tmp_path / f"probe{i}")
        took = min(took, time.perf_counter() - t0)
    rng = random.Random(0)
    outcomes = {"stopped": 0, "pending": 0}
    for i in range(15):
        out = tmp_path / f"m{i}"
        timer = threading.Timer(rng.uniform(0, took * 1.2), os.kill, (os.getpid(), signal.SIGTERM))
        t0 = time.perf_counter()
        timer.start()
        try:
            with _signals.deferred():  # as under a campaign: a stop after the merge only sets the flag
                run_merge(recipe, out)
                took = min(took, time.perf_counter() - t0)
                timer.join()
                time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
            assert _signals.pending() == signal.SIGTERM, f"try {i}: the stop was lost"
            outcomes["pending"] += 1
        except _signals.Terminated:
            timer.join()
            assert not out.exists() and not list(tmp_path.glob(f".m{i}.*")), f"try {i}: debris"
            outcomes["stopped"] += 1
        _signals.clear()
    assert outcomes["stopped"] >= 3, (outcomes, took)


def test_sigterm_at_random_points_of_tracked_merges_never_leaves_a_running_run(platform_store: Store,
                                                                                tmp_path: Path,
                                                                                handlers: None) -> None:
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    ev = WeightEvaluator(base, {"vqa": experts[0], "ocr": experts[1]})
    recipe = MergeRecipe.build(base=base, experts=experts, method="task_arithmetic", policy="llama", device="cpu")
    client = platform_store.client()
    t0 = time.perf_counter()
    tracked_merge(recipe, store=platform_store, experiment="probe", tasks=["vqa", "ocr"], evaluator=ev)
    took = time.perf_counter() - t0
    rng = random.Random(1)
    for i in range(6):
        timer = threading.Timer(rng.uniform(0, took), os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            with _signals.deferred():
                tracked_merge(recipe, store=platform_store, experiment="unit", tasks=["vqa", "ocr"], evaluator=ev)
                timer.join()
                time.sleep(0.01)
            assert _signals.pending() == signal.SIGTERM, f"try {i}: the stop was lost"
        except _signals.Terminated:
            timer.join()
        _signals.clear()
    runs = client.search_runs([platform_store.experiment_id("unit", client)])
    assert len(runs) <= 6 and all(r.info.status in ("FINISHED", "KILLED") for r in runs), \
        [r.info.status for r in runs]
    assert _leftovers(platform_store, runs) == []


# `mergelab` with a merge slowed down between tensors, so that a signal lands inside it
_SLOW_CLI = """
import sys, time
from mergelab.engine import loop
from mergelab.platform.cli import main

_one = loop._merge_one
def slow(*a, **kw):
    time.sleep(1.0)
    return _one(*a, **kw)
loop._merge_one = slow
sys.exit(main())
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_merge_command_exits_128_plus_signal_one_line_run_killed(platform_store: Store, tmp_path: Path,
                                                                           sig: str, code: int) -> None:
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts], "method": "ties",
                                 "policy": "llama", "device": "cpu"}))
    env = {**os.environ, "MERGELAB_TRACK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, "merge", str(y), "--out", str(tmp_path / "out"), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    client = platform_store.client()
    # Generous limits, not tight ones: at a load average of 10-25 on two cores, starting the interpreter and
    # importing torch takes tens of seconds, and after the stop the command still imports mlflow and opens the store
    # to record the run KILLED. The merge sleeps 1 s per tensor (12 tensors), so the signal lands inside it even
    # when this poller is descheduled for seconds.
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.tmp-*")):  # wait until the merge is under way (its run is made after it)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the merge never started (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and sig in err, err
    (run,) = client.search_runs([platform_store.experiment_id("mergelab", client)])
    assert run.info.status == "KILLED"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_dead_workers_trial_is_run_again_when_survivors_finish_inside_the_grace_period(platform_store: Store,
                                                                                         tmp_path: Path) -> None:
    """A worker SIGKILLed mid-trial: its trial stays RUNNING until its heartbeat is stale. The survivor used to
    count it against the budget and stop one trial short, leaving the parent RUNNING; now it waits for the stale
    trial to fail and runs one more, so the study ends with exactly its budget of COMPLETE trials."""
    cfg, ev = _campaign(tmp_path, tracking={"heartbeat_interval": 1, "grace_period": 2},
                        registry={"register": "none"})
    client = platform_store.client()
    storage = optuna.storages.RDBStorage(platform_store.optuna_storage, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="camp", storage=storage, direction="maximize")
    dead = study.ask()  # the dead worker's trial: it beat once, then nothing
    run = client.create_run(platform_store.experiment_id("mergelab", client), tags={"mergelab.trial": "0"})
    dead.set_user_attr(RUN_ATTR, run.info.run_id)
    storage.record_heartbeat(dead._trial_id)
    res = run_campaign(cfg, store=platform_store, evaluator=ev)  # starts at once, inside the grace period
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert res.n_complete == 2
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    complete_runs = [client.get_run(t.user_attrs[RUN_ATTR]) for t in study.trials if t.state.name == "COMPLETE"]
    assert all(r.info.status == "FINISHED" for r in complete_runs)


# --------------------------------------------------------------------------------------------------------------
# Tensor accounting: no tensor of the base or of an expert is dropped silently
# --------------------------------------------------------------------------------------------------------------


def test_the_report_accounts_for_every_tensor(tmp_path: Path) -> None:
    from conftest import tiny_state, write_sharded

    from mergelab.engine import merge

    base = write_sharded(tmp_path / "base", tiny_state(0))
    sd = {k: v + 0.01 for k, v in tiny_state(0).items()}
    a = write_sharded(tmp_path / "a", {**sd, "vision.proj.weight": torch.ones(4, 4)}, n_shards=1)  # only a has it
    b = write_sharded(tmp_path / "b", sd, n_shards=1)
    rules = {"preset": "llama", "rules": [{"pattern": r"lm_head\..*", "action": "base"}]}
    rep = merge(base=base, experts=[a, b], method="ties", policy=rules, device="cpu", out=tmp_path / "out",
                carry_unique=True)
    acc = rep.accounting
    n_base = len(tiny_state(0))
    assert sum(acc["base"].values()) == n_base and acc["base"]["copied"] >= 1  # lm_head kept by the policy
    assert acc["experts"]["a"]["owned"] == 1 and sum(acc["experts"]["a"].values()) == n_base + 1
    assert acc["experts"]["b"]["excluded"] == acc["base"]["copied"] and sum(acc["experts"]["b"].values()) == n_base
    assert acc["experts"]["b"].get("merged", 0) == acc["base"].get("merged", 0)
    assert "accounted: base" in rep.summary() and "expert a:" in rep.summary()
    assert rep.to_dict()["accounting"] == acc


def test_an_adapter_tensor_that_changes_nothing_is_an_error_naming_it(tmp_path: Path) -> None:
    """A lora_B without its lora_A used to be skipped in silence: the expert's change was lost."""
    import json

    from conftest import tiny_state, write_sharded
    from safetensors.torch import save_file

    from mergelab.engine import MergeError, merge

    base = write_sharded(tmp_path / "base", tiny_state(0))
    lora = tmp_path / "lora"
    lora.mkdir()
    p = "base_model.model.model.layers.0."
    save_file({p + "self_attn.q_proj.lora_A.weight": torch.randn(2, 16),
               p + "self_attn.q_proj.lora_B.weight": torch.randn(16, 2),
               p + "mlp.up_proj.lora_B.weight": torch.randn(24, 2)}, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(MergeError, match=r"mlp\.up_proj\.lora_B\.weight changes no base tensor"):
        merge(base=base, experts=[lora], method="task_arithmetic", policy="llama", device="cpu",
              out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fault_matrix_case_kill9_one_worker(tmp_path: Path) -> None:
    """The fast case of benchmarks/faults.py: a `mergelab worker`-like process SIGKILLed at a random moment of its
    work, a fresh worker finishing the budget: every check of the matrix holds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import faults

    env = faults._env_for("sqlite", None, None, tmp_path, 0)
    res = faults.campaign_case(tmp_path, env, 1, "kill9", random.Random(0))
    assert all(v for v in res.values() if isinstance(v, bool)), res
    assert res["n_complete"] == faults.BUDGET
