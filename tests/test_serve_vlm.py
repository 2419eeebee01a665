"""``mlflow models serve`` on a registered VLM version answers HTTP requests as mergelab does in-process.

A merge of the zoo's tiny Qwen2-VL experts (seed 0, task arithmetic) is tracked and registered as ``@champion`` in
the test's store; the ``mlflow models serve`` line of docs/ui.md runs as a subprocess (its model name and port
replaced; ``PATH`` starting with this interpreter's ``bin/``, as an activated virtual environment has it), and the
request docs/ui.md shows is posted with a real image. Answers must equal mergelab's own generation runner. Skipped only
when the server cannot start for a reason of the environment (no ``uvicorn`` beside this interpreter).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mergelab.bench.tasks import generate as make_samples
from mergelab.engine import MergeRecipe
from mergelab.evaluators.runner import build_prompt, generate
from mergelab.evaluators.tasks import get_task
from mergelab.hf import load_model
from mergelab.platform import registry as reg
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.store import Store

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "mergelab" / "bench" / "zoo" / "seed0"
DOC = REPO / "docs" / "ui.md"
NAME = "served-vlm"
START_S = 300  # the server imports mlflow, torch and transformers and loads the model: tens of seconds at load 20


def documented() -> tuple[list[str], dict[str, Any]]:
    """The ``mlflow models serve`` command line of docs/ui.md (words) and the JSON request after it."""
    text = DOC.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(".venv/bin/mlflow models serve"))
    request = re.search(r"```json\n(.*?)```", text[text.index(line):], re.S)
    assert request is not None, "docs/ui.md: no JSON request after the serve command"
    return shlex.split(line), json.loads(request.group(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=START_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _command(words: list[str], port: int) -> list[str]:
    """The documented words with this interpreter's mlflow, the test's model name and a free port."""
    bindir = Path(sys.executable).parent
    exe = [str(bindir / "mlflow")] if (bindir / "mlflow").is_file() else [sys.executable, "-m", "mlflow"]
    assert words[:3] == [".venv/bin/mlflow", "models", "serve"], words
    args = [w.replace("models:/NAME@champion", f"models:/{NAME}@champion") for w in words[3:]]
    args[args.index("-p") + 1] = str(port)
    assert "--env-manager" in args and args[args.index("-h") + 1] == "127.0.0.1", args
    return exe + ["models", "serve", *args]


@pytest.fixture
def served(platform_store: Store, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A registered tiny VLM merge served by the documented command: ``(port, the version's directory)``."""
    bindir = Path(sys.executable).parent
    if shutil.which("uvicorn", path=str(bindir)) is None:
        pytest.skip(f"no uvicorn beside {sys.executable}: mlflow models serve starts it by name")
    recipe = MergeRecipe.build(base=ZOO / "base", experts=[ZOO / "full" / "chart", ZOO / "full" / "ocr"],
                               method="task_arithmetic", policy="auto", device="cpu")
    tm = tracked_merge(recipe, store=platform_store, experiment="serve")
    client = platform_store.client()
    mv = reg.register_run(client, NAME, tm.run_id, tm.merged_uri)
    client.set_registered_model_alias(NAME, "champion", mv.version)
    assert tm.merged_path is not None and (tm.merged_path / "MLmodel").is_file()
    words, _ = documented()
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": platform_store.tracking_uri, "MLFLOW_REGISTRY_URI": platform_store.tracking_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # a free port taken by another process before the server binds it: another port
        port, log_path = _free_port(), tmp_path / f"serve-{attempt}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(_command(words, port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: the CLI and its uvicorn
        try:
            if _wait_until_up(proc, port):
                yield port, tm.merged_path
                return
        finally:
            _stop(proc)
        text = log_path.read_text()
        if "address already in use" not in text.lower():
            pytest.fail(f"mlflow models serve did not come up (exit {proc.returncode}):\n{text[-4000:]}")
    pytest.fail("mlflow models serve found no free port in 3 tries")


def _wait_until_up(proc: subprocess.Popen[bytes], port: int) -> bool:
    """True once ``GET /ping`` answers 200; False when the server exits first or does not answer in time."""
    deadline = time.monotonic() + START_S
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the CLI may be gone while its uvicorn child is not), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(30)
            time.sleep(0.5)  # the group's other members
        except subprocess.TimeoutExpired:
            continue
    proc.wait(30)


@pytest.mark.slow
def test_a_served_vlm_version_answers_the_documented_request_like_mergelab(served: tuple[int, Path]) -> None:
    port, folder = served
    sample = make_samples("chart", "shifted", "test", n=1)[0]
    png = io.BytesIO()
    sample.image.save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    question = get_task("chart").prompt(sample)
    _, request = documented()
    rows = request["dataframe_records"]
    assert rows[0]["image"].startswith("iVBORw0KGgo") and "image" not in rows[1]  # a PNG's base64, then text only
    rows[0] = {"image": b64, "question": question}
    text_question = rows[1]["question"]

    model, processor = load_model(folder)
    n = int(request["params"]["max_new_tokens"])
    want = [generate(model, processor, [build_prompt(processor, question, with_image=True, model_type="qwen2_vl")],
                     [sample.image], max_new_tokens=n)[0],
            generate(model, processor, [build_prompt(processor, text_question, with_image=False,
                                                     model_type="qwen2_vl")], None, max_new_tokens=n)[0]]

    assert all(want), want  # real answers, so that equal answers mean something
    status, body = _post(port, request)
    assert status == 200, body
    assert body == {"predictions": want}
    # the other accepted forms (MLflow hands `inputs` over as numpy arrays), per-call params
    split = {"dataframe_split": {"columns": ["image", "question"], "data": [[b64, question]]},
             "params": request["params"]}
    columns = {"inputs": {"image": [b64, None], "question": [question, text_question]}, "params": request["params"]}
    records = {"inputs": [{"image": b64, "question": question}], "params": request["params"]}
    assert _post(port, split) == (200, {"predictions": want[:1]})
    assert _post(port, columns) == (200, {"predictions": want})
    assert _post(port, records) == (200, {"predictions": want[:1]})
    # a path on the server is refused, as is a row without a question
    status, body = _post(port, {"dataframe_records": [{"image": str(folder / "config.json"), "question": "hi"}]})
    assert status == 400 and "a served model reads no image files" in json.dumps(body)
    status, body = _post(port, {"dataframe_records": [{"image": b64}]})
    assert status == 400 and "no 'question' text" in json.dumps(body)
