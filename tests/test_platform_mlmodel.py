"""A registered VLM version is a real MLflow model: ``mlflow.pyfunc.load_model("models:/NAME@champion")`` loads the
version's own directory (no copy) through :mod:`mergelab.platform.pyfunc_vlm` and answers ``{image, question}``
rows exactly as mergelab's evaluators do. The model is the shipped zoo's tiny Qwen2-VL (seed 0's base).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest_platform import fluent_uris
from PIL import Image

from mergelab.platform import registry as reg
from mergelab.platform.mlmodel import VLM_LOADER, write_mlmodel
from mergelab.platform.store import Store, local_path

ZOO_BASE = Path(__file__).resolve().parents[1] / "mergelab" / "bench" / "zoo" / "seed0" / "base"


def _link_tree(src: Path, dst: Path) -> None:
    """``src``'s files in ``dst``, hard-linked (the shipped zoo stays read-only: MLmodel is written in ``dst``)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


@pytest.fixture
def mlflow_uris(platform_store: Store) -> Iterator[None]:
    """The fluent API pointed at the test's store for the test, then back (environment included)."""
    with fluent_uris(platform_store.tracking_uri):
        yield


def served_params(meta: dict) -> list[str]:
    import json

    return [p["name"] for p in json.loads(meta["signature"]["params"])]


def test_a_registered_vlm_loads_with_mlflow_pyfunc_and_answers_like_mergelab(
    platform_store: Store, mlflow_uris: None
) -> None:
    import mlflow
    import pandas as pd

    from mergelab.bench.tasks import generate as make_samples
    from mergelab.evaluators.runner import build_prompt, generate
    from mergelab.evaluators.tasks import get_task
    from mergelab.hf import load_model

    client = platform_store.client()
    run = client.create_run(platform_store.experiment_id("served-vlm", client))
    uri = f"{run.info.artifact_uri}/merged"
    folder = local_path(uri)
    _link_tree(ZOO_BASE, folder)
    weights = {p.name: p.stat().st_ino for p in folder.glob("*.safetensors")}
    mv = reg.register_run(client, "served-vlm", run.info.run_id, uri)
    client.set_registered_model_alias("served-vlm", "champion", mv.version)

    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert list(meta["flavors"]) == ["python_function"]
    assert meta["flavors"]["python_function"]["loader_module"] == VLM_LOADER
    assert meta["flavors"]["python_function"]["data"] == "."
    assert served_params(meta) == ["max_new_tokens", "batch_size"]
    assert meta["flavors"]["python_function"]["config"]["max_new_tokens"] == 32
    assert not (ZOO_BASE / "MLmodel").exists()  # written in the version's directory only

    samples = [s for task in ("chart", "grounding") for s in make_samples(task, "shifted", "test", n=2)]
    questions = [get_task(s.task).prompt(s) for s in samples]
    model, processor = load_model(folder)
    prompts = [build_prompt(processor, q, with_image=True, model_type="qwen2_vl") for q in questions]
    expected = generate(model, processor, prompts, [s.image for s in samples], max_new_tokens=32)

    served = mlflow.pyfunc.load_model("models:/served-vlm@champion")
    assert served.metadata.flavors["python_function"]["loader_module"] == VLM_LOADER
    frame = pd.DataFrame({"image": [s.image for s in samples], "question": questions})
    assert served.predict(frame) == expected
    png = io.BytesIO()
    samples[0].image.save(png, format="PNG")
    path = folder.parent / "one.png"
    path.write_bytes(png.getvalue())
    for image in (str(path), png.getvalue(), base64.b64encode(png.getvalue()).decode()):  # path, bytes, base64
        assert served.predict({"image": image, "question": questions[0]}) == expected[:1]
    i = max(range(len(expected)), key=lambda j: len(expected[j]))  # a grounding box: many tokens
    short = generate(model, processor, prompts[i : i + 1], [samples[i].image], max_new_tokens=2)
    assert short[0] != expected[i]  # two tokens are not the whole answer: the test below sees params applied
    text_only = served.predict([{"question": questions[i]}, {"image": samples[i].image, "question": questions[i]}],
                               params={"max_new_tokens": 2})
    assert len(text_only) == 2 and text_only[1] == short[0]
    configured = mlflow.pyfunc.load_model("models:/served-vlm@champion", model_config={"max_new_tokens": 2})
    assert configured.predict({"image": samples[i].image, "question": questions[i]}) == short  # load-time option
    assert mlflow.artifacts.download_artifacts("models:/served-vlm@champion") == str(folder)  # no copy
    assert {p.name: p.stat().st_ino for p in folder.glob("*.safetensors")} == weights  # stored once


def test_rows_are_checked_and_directories_mlflow_cannot_load_get_no_mlmodel(tmp_path: Path) -> None:
    from mergelab.platform.pyfunc_vlm import rows_of, to_image

    assert rows_of({"image": [None, None], "question": ["a", "b"]}) == [{"image": None, "question": "a"},
                                                                      {"image": None, "question": "b"}]
    assert rows_of("hi") == [{"image": None, "question": "hi"}]
    with pytest.raises(ValueError, match="row 0: no 'question'"):
        rows_of([{"image": None}])
    with pytest.raises(ValueError, match="neither an existing file nor base64"):
        to_image("no/such/file.png")
    assert to_image(float("nan")) is None
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    assert not write_mlmodel(tmp_path) and not (tmp_path / "MLmodel").exists()
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2VLForConditionalGeneration"], '
                                          '"vision_config": {}}')
    assert not write_mlmodel(tmp_path)  # a VLM without its image processor: nothing MLflow could load


def test_rows_from_a_served_request_and_served_models_read_no_files(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's scoring server hands a JSON request's ``inputs`` over as numpy arrays (columns, rows, 0-d strings),
    which used to fail ("row 0: no 'question' text"); and a served model must not open files the request names."""
    from mergelab.platform.pyfunc_vlm import SERVING_ENV, rows_of, serving, to_image

    want = [{"image": None, "question": "a"}, {"image": "eA==", "question": "b"}]
    assert rows_of({"image": np.array([None, "eA=="], dtype=object), "question": np.array(["a", "b"])}) == want
    assert rows_of([{"question": np.array("a")}, {"image": np.array("eA=="), "question": np.array("b")}]) == want
    assert rows_of({"image": np.array("eA=="), "question": np.array("b")}) == want[1:]
    assert rows_of(np.array(["a"])) == want[:1]
    png = tmp_path / "one.png"
    Image.new("RGB", (4, 4), "red").save(png)
    assert to_image(str(png)).size == (4, 4) and not serving()
    monkeypatch.setenv(SERVING_ENV, "true")
    assert serving()
    with pytest.raises(ValueError, match="a served model reads no image files"):
        to_image(str(png), paths=not serving())
    data = base64.b64encode(png.read_bytes()).decode()
    assert to_image(data, paths=False).size == (4, 4)  # the image's bytes are what a request sends
    with pytest.raises(ValueError, match="not a readable image"):
        to_image(base64.b64encode(b"not an image").decode(), paths=False)


def test_mlmodel_reads_config_json_as_json_and_leaves_no_debris(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A tab-indented config.json is valid JSON but not YAML (it was parsed as YAML: no MLmodel, silently); a
    failed write leaves no temporary file in the version's directory."""
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        data = {"architectures": ["LlamaForCausalLM"]} if f == "config.json" else {}
        (tmp_path / f).write_text(json.dumps(data, indent="\t"))
    assert write_mlmodel(tmp_path)
    meta = yaml.safe_load((tmp_path / "MLmodel").read_text())
    assert meta["flavors"]["transformers"]["tokenizer_type"] == "PreTrainedTokenizerFast"
    (tmp_path / "MLmodel").unlink()

    def full_disk(self: Path, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_mlmodel(tmp_path)
    assert not (tmp_path / "MLmodel").exists() and not list(tmp_path.glob(".MLmodel*"))
