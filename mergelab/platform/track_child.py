"""A merge's MLflow run recorded by a child process, so that ``mergelab merge CONFIG --out DIR`` never imports mlflow.

Importing mlflow and opening its SQL store costs about 2-3 s of pure-Python CPU (a fresh SQLite database is a copy of
a schema template, :mod:`mergelab.platform.store_template`; MLflow's migrations, seconds more, run only when the
template is built). Done in a thread of the merging process it holds the interpreter lock and slows the merge as
much as it overlaps it; done in a child process the two run in parallel on two cores.
:func:`~mergelab.platform.merge_run.tracked_merge` takes this path when the run is not needed before the merge
ends (an explicit output directory, no evaluation, no ``on_run`` callback, and mlflow not imported yet by the
calling process).

Protocol (JSON lines; the child runs :func:`main` of this module, from the parent's source tree, with the parent's
environment):

1. the child imports mlflow as soon as it starts; parent -> child, once the caller's input checks passed:
   ``{"store": {tracking_uri, artifact_root, optuna_storage}, "experiment": name}``; the child opens the store
   (:meth:`Store.client`: schema lock, the template's copy or migrations) and gets or creates the experiment, then
   answers ``{"open": experiment_id}`` or ``{"error": "MLflow store URI: ..."}`` (one line) and exits;
2. parent -> child, after the merge: one record, plain data: ``start`` (:func:`~mergelab.platform.merge_run.
   run_start`: start time, run name, tags, params, the ``config/merge.yaml`` dict), then ``metrics``, ``report``
   (the ``merge_report.json`` dict) and ``merged_uri`` when the merge produced them, ``end_run`` (set it FINISHED)
   or ``failure`` (:func:`failure`) and ``weights_deleted``; the child creates the run with the true start time,
   logs exactly what the in-process path logs (:func:`create_run`, :func:`log_merge`, :func:`end_failed`), ends it
   and answers ``{"run_id": ..., "link": <its UI link>}`` or ``{"error": ...}``, then exits.

The child never outlives its parent: end of input before the record (the parent finished without one, or died,
``kill -9`` included) makes it exit at once without creating a run -- after the store's opening if that is under
way, never in the middle of a migration. It ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole process group,
and the parent, stopped, still records its run KILLED through the child. Its standard output carries only the
answers (the libraries' prints go to standard error, which it shares with the parent).

This module imports neither torch nor the engine (the child stays small), and mlflow only in the child.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import mergelab
from mergelab.platform.exit_codes import one_line
from mergelab.platform.store import (
    TAG_ERROR,
    TAG_MERGED,
    TAG_WEIGHTS,
    Store,
    end_run_as,
    end_status,
    fail_run,
    log_metrics,
    log_params,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODULE = "mergelab.platform.track_child"
"""The module whose :func:`main` the child runs."""

WAIT_EXIT_S = 60.0
"""How long :meth:`TrackingChild.close` waits for the child to exit before killing it."""


class TrackingError(RuntimeError):
    """The child could not open the store or record the run; the message is one line naming the store."""


# --- what a merge's run records: used in the merging process (in-process path) and in the child alike -----------


def create_run(client: MlflowClient, exp_id: str, start: Mapping[str, Any]) -> str:
    """Create a merge's run from :func:`~mergelab.platform.merge_run.run_start`'s data (started at its start time)
    with its tags, params and ``config/merge.yaml``; a failure to log them ends the run FAILED and is raised."""
    run_id = client.create_run(exp_id, start_time=start["start_time"], run_name=start["run_name"],
                               tags=dict(start["tags"])).info.run_id
    try:
        log_params(client, run_id, start["params"])
        client.log_dict(run_id, start["config"], "config/merge.yaml")
    except BaseException as e:
        fail_run(client, run_id, e)
        raise
    return run_id


def log_merge(client: MlflowClient, run_id: str, metrics: Mapping[str, float], report: Mapping[str, Any],
              merged_uri: str) -> None:
    """Log a finished merge: its metrics, ``merge_report.json`` and where its weights are (present)."""
    log_metrics(client, run_id, metrics)
    client.log_dict(run_id, dict(report), "merge_report.json")
    client.set_tag(run_id, TAG_MERGED, merged_uri)
    client.set_tag(run_id, TAG_WEIGHTS, "present")


def failure(error: BaseException) -> dict[str, Any]:
    """How a run ended by ``error`` is recorded, as plain data: KILLED and tagged pruned for a pruned trial (an
    ``optuna.TrialPruned``-like error: its class name contains ``Pruned``), else FAILED (KILLED when stopped: Ctrl-C,
    SIGTERM) with the error's ``repr`` in ``mergelab.error``."""
    pruned = "Pruned" in type(error).__name__
    return {"status": "KILLED" if pruned else end_status(error), "pruned": pruned, "error": repr(error)[:5000]}


def end_failed(client: MlflowClient, run_id: str, how: Mapping[str, Any], weights_deleted: bool = False) -> None:
    """End a run as :func:`failure` describes, its weights tagged deleted when they were removed. Best effort
    (:func:`~mergelab.platform.store.end_run_as`): never masks the error at hand."""
    tags = {"mergelab.pruned": "true"} if how["pruned"] else {TAG_ERROR: how["error"]}
    if weights_deleted:
        tags[TAG_WEIGHTS] = "deleted"
    end_run_as(client, run_id, how["status"], tags)


def record(client: MlflowClient, exp_id: str, rec: Mapping[str, Any]) -> str:
    """Create, log and end the run a record describes (the module docstring's step 2); returns its id. When logging
    fails the run ends FAILED, its weights tagged deleted (the parent removes them when this fails), and the error
    is raised."""
    run_id = create_run(client, exp_id, rec["start"])
    try:
        if rec.get("metrics") is not None:
            log_merge(client, run_id, rec["metrics"], rec["report"], rec["merged_uri"])
        if rec.get("failure") is not None:
            end_failed(client, run_id, rec["failure"], bool(rec.get("weights_deleted")))
        elif rec.get("end_run"):
            client.set_terminated(run_id, status="FINISHED")
    except BaseException as e:
        end_failed(client, run_id, failure(e), weights_deleted=rec.get("merged_uri") is not None)
        raise
    return run_id


# --- the parent's end --------------------------------------------------------------------------------------------


class TrackingChild:
    """A child process that imports mlflow as soon as it is made, then, once :meth:`open` names the store, opens it
    and gets the experiment while the caller merges; :meth:`record` then sends it one run. Always :meth:`close` it
    (it exits once its input ends). ``mergelab merge`` makes it first thing, so that mlflow's import runs beside
    torch's and the input checks, and opens it once the checks pass (bad input creates no database)."""

    def __init__(self) -> None:
        self.uri = "(not named yet)"
        self.done = False  # whether record() was called (it is tried once)
        # the child runs this very source tree: first on its path, before the working directory and PYTHONPATH
        src = str(Path(mergelab.__file__).resolve().parents[1])
        code = f"import sys; sys.path.insert(0, {src!r}); from {MODULE} import main; sys.exit(main())"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, encoding="utf-8")

    def open(self, store: Store, experiment: str) -> None:
        """Have the child open ``store`` and get or create ``experiment`` (the module docstring's step 1)."""
        self.uri = store.tracking_uri
        self._send({"store": dataclasses.asdict(store), "experiment": experiment})

    def record(self, rec: Mapping[str, Any]) -> tuple[str, str]:
        """Send one run (the module docstring's step 2) once the store is open; returns its id and UI link.

        Raises:
            TrackingError: the store could not be opened or the run not recorded (one line naming the store).
        """
        self.done = True
        self._answer()  # the store is open (or why not)
        self._send(rec)
        answer = self._answer()
        return answer["run_id"], answer["link"]

    def close(self) -> None:
        """End the child's input (it exits: at once without a record) and reap it."""
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(WAIT_EXIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _send(self, msg: Mapping[str, Any]) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(msg, default=str) + "\n")
            self._proc.stdin.flush()
        except OSError:  # the child is gone: _answer() says so
            pass

    def _answer(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise TrackingError(f"MLflow store {self.uri}: the tracking process ended without an answer "
                                f"(exit status {self._proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise TrackingError(answer["error"])
        return answer


# --- the child ---------------------------------------------------------------------------------------------------


def main() -> int:
    """The child process (the module docstring's protocol). Returns its exit status (0, or 1 after an error); after
    recording a run it exits at once instead."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the parent is stopped, and records its run KILLED through this process
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints of the libraries go to stderr, never into the answers
    if os.environ.get("MERGELAB_VERBOSE", "") in ("", "0"):
        warnings.filterwarnings("ignore")  # as the CLI: the libraries' warnings only with -v
    lines: queue.Queue[str | None] = queue.Queue()
    opening = threading.Lock()  # held while the store opens: an end of input waits for it (no half migration)
    threading.Thread(target=_read, args=(lines, opening), name="mergelab-track-input", daemon=True).start()
    # imported here, not at the top: the parent imports this module and must not import mlflow (ui does); first
    # thing, while the parent imports torch and checks its input
    import_mlflow_without_pandas()
    from mergelab.platform.ui import run_url, ui_base

    first = lines.get()
    if first is None:
        return 0
    msg = json.loads(first)
    store = Store(**msg["store"])
    try:
        with opening:
            client = store.client()
            exp_id = store.experiment_id(msg["experiment"], client)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the call
        return _error(answers, store, e)
    _write(answers, {"open": exp_id})
    rec = lines.get()
    if rec is None:
        return 0
    try:
        run_id = record(client, exp_id, json.loads(rec))
        link = run_url(ui_base(store), exp_id, run_id)
    except Exception as e:  # noqa: BLE001
        return _error(answers, store, e)
    _write(answers, {"run_id": run_id, "link": link})
    # done, everything committed: exit now, without the interpreter's shutdown (a second of the libraries' exit
    # hooks that the parent, waiting to reap this process, would pay for)
    os._exit(0)


def import_mlflow_without_pandas() -> None:
    """Import mlflow as mlflow-skinny (which does not require pandas) runs it: with pandas unimportable while its
    modules load, they skip their pandas parts. It is 0.35-0.4 s of the 1.9 s that importing mlflow and its SQL store
    takes, on the tracked merge's critical path (the child is busy from its start until it answers, as long as the
    merge). The child logs plain data only (params, metrics, tags, dicts), none of which needs pandas; pandas is
    importable again afterwards. A release whose import fails without pandas is imported again as it is."""
    if "pandas" in sys.modules:
        import mlflow  # noqa: F401
        return
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
    try:
        import mlflow  # noqa: F401, F811
    except ImportError:
        for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
            del sys.modules[name]
        del sys.modules["pandas"]
        import mlflow  # noqa: F401, F811
    finally:
        if "pandas" in sys.modules and sys.modules["pandas"] is None:
            del sys.modules["pandas"]


def _read(lines: queue.Queue[str | None], opening: threading.Lock) -> None:
    """Forward the parent's lines; at the end of input before a record, exit the process (the parent is gone)."""
    n = 0
    for line in sys.stdin:
        n += 1
        lines.put(line)
    if n < 2:
        with opening:
            os._exit(0)
    lines.put(None)


def _write(answers: IO[str], msg: Mapping[str, Any]) -> None:
    answers.write(json.dumps(msg) + "\n")
    answers.flush()


def _error(answers: IO[str], store: Store, e: BaseException) -> int:
    _write(answers, {"error": f"MLflow store {store.tracking_uri}: {type(e).__name__}: {one_line(e)}"})
    return 1


if __name__ == "__main__":
    sys.exit(main())
