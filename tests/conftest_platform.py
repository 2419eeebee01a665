"""Platform test fixtures: a real SQLite MLflow store per test (copied from one template migrated per session:
a fresh MLflow DB costs ~7 s of alembic migrations, spec/ecosystem.md pitfall 4), tiny experts, and a deterministic
evaluator that scores a merged checkpoint from its weights (so objectives really depend on the hyperparameters).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TEMPLATE_NAME = "mlflow-template.db"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite DB migrated once per session (shared by every module that imports this fixture)."""
    root = tmp_path_factory.getbasetemp() / "mlflow-template"
    db = root / TEMPLATE_NAME
    if not db.exists():
        from mlflow import MlflowClient

        root.mkdir(parents=True, exist_ok=True)
        tmp = root / "building.db"
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # runs the migrations
        tmp.rename(db)
    return db


@pytest.fixture
def platform_store(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A :class:`~mergelab.platform.merge_run.Store` on a private copy of the template DB and a fresh Optuna file."""
    from mergelab.platform.store import Store

    for var in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ARTIFACT_ROOT", "MERGELAB_ROOT"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "mlruns"
    root.mkdir()
    shutil.copy(mlflow_template, root / "mlflow.db")
    monkeypatch.setenv("MERGELAB_ROOT", str(root))
    monkeypatch.setenv("MERGELAB_TRACK", "0")
    return Store.resolve(root)


@contextlib.contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` (tracking and registry), then back as it was, environment included:
    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` (and the registry's variable), and restoring the
    default URI that way would leave ``sqlite:///<cwd>/mlflow.db`` in the environment of every later test and of
    the commands they start (it did: later stores landed in the repository root)."""
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_expert_family(root: Path, n: int = 3, scale: float = 0.1) -> tuple[Path, list[Path]]:
    """A tiny base (2 shards, Llama names, config.json) and ``n`` full fine-tuned experts around it."""
    import json

    from conftest import tiny_state, write_sharded

    base = tiny_state(0)
    bdir = write_sharded(root / "base", base)
    (bdir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = write_sharded(root / f"task{i}", sd, n_shards=1)
        (d / "config.json").write_text((bdir / "config.json").read_text())
        paths.append(d)
    return bdir, paths


def _load(d: Path) -> dict[str, torch.Tensor]:
    from mergelab.engine import CheckpointReader

    r = CheckpointReader(d)
    return {k: r.get(k).float() for k in r.keys()}


class WeightEvaluator:
    """Scores a checkpoint per task by how close its weights are to that task's expert, relative to the base:
    ``100 * clamp(1 - |theta - theta_i| / |theta_0 - theta_i|, 0)`` (base: 0, expert: 100 on its own task).
    The test split adds a fixed per-task offset so val and test differ. Same call signature as the platform's
    evaluator: ``(model_dir, tasks, split, on_task) -> EvalResult``."""

    def __init__(self, base: Path, experts: dict[str, Path], fail_on: set[str] | None = None) -> None:
        self.base = _load(base)
        self.experts = {t: _load(p) for t, p in experts.items()}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, model_dir: Path, tasks: Sequence[str], split: str, on_task=None):  # noqa: ANN001, ANN204
        from mergelab.evaluators import EvalResult

        self.calls.append((str(model_dir), split))
        theta = _load(Path(model_dir))
        total = EvalResult(split=split, scores={})
        for i, task in enumerate(tasks):
            ex = self.experts[task]
            num = sum(float((theta[k] - ex[k]).pow(2).sum()) for k in ex) ** 0.5
            den = sum(float((self.base[k] - ex[k]).pow(2).sum()) for k in ex) ** 0.5
            score = max(0.0, 100.0 * (1.0 - num / den)) + (1.0 + i if split == "test" else 0.0)
            part = EvalResult(split=split, scores={task: score}, metrics={f"{task}/accuracy": score},
                               records=[{"task": task, "id": f"{task}-{j}", "prediction": "x", "references": ["x"],
                                         "score": score / 100.0} for j in range(3)])
            total.update(part)
            if on_task is not None:
                on_task(task, total)
        return total


class TableEvaluator:
    """An evaluator returning fixed per-task scores per model directory (for promotion decisions)."""

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table = table
        self.calls: list[tuple[str, str]] = []

    def __call__(self, model_dir: Path, tasks: Sequence[str], split: str, on_task=None):  # noqa: ANN001, ANN204
        from mergelab.evaluators import EvalResult

        self.calls.append((str(model_dir), split))
        scores = self.table[Path(model_dir).parent.parent.name if Path(model_dir).name == "merged"
                            else Path(model_dir).name]
        return EvalResult(split=split, scores={t: scores[t] for t in tasks})


@pytest.fixture(autouse=True)
def _isolated_mlruns(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write to the user's ``./mlruns``: tracking goes to a session store in tmp (copied from the
    template when that already exists), and ``mergelab merge`` is untracked (``MERGELAB_TRACK=0``) unless a test
    asks for ``--track`` (a fresh MLflow DB costs ~7 s of migrations)."""
    root = tmp_path_factory.getbasetemp() / "mlruns-session"
    if not root.exists():
        root.mkdir(parents=True)
        template = tmp_path_factory.getbasetemp() / "mlflow-template" / TEMPLATE_NAME
        if template.exists():
            shutil.copy(template, root / "mlflow.db")
    for var in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MERGELAB_ROOT", str(root))
    monkeypatch.setenv("MERGELAB_TRACK", "0")


CAMPAIGN_TASKS = ["vqa", "geometry", "ocr"]


def tiny_campaign(tmp_path: Path, **over: object) -> tuple[Any, WeightEvaluator]:
    """A task-arithmetic campaign over three tiny experts (one per task of ``CAMPAIGN_TASKS``) and the evaluator
    that scores a merge by its distance to each expert; ``over`` replaces top-level campaign fields."""
    from mergelab.platform.campaign_config import CampaignConfig

    base, experts = make_expert_family(tmp_path / "zoo", n=3)
    raw: dict[str, object] = {
        "name": "camp", "base": str(base), "method": "task_arithmetic", "policy": "llama", "device": "cpu",
        "experts": [{"path": str(p), "name": t, "score": 100.0}
                    for p, t in zip(experts, CAMPAIGN_TASKS, strict=True)],
        "search_space": {"lam": {"type": "float", "low": 0.1, "high": 1.2}},
        "eval": {"tasks": CAMPAIGN_TASKS},
    }
    raw.update(over)
    return CampaignConfig.model_validate(raw), WeightEvaluator(base, dict(zip(CAMPAIGN_TASKS, experts, strict=True)))
