"""The ``python_function`` loader of a registered vision-language model: ``mlflow.pyfunc.load_model`` on a VLM version.

MLflow 3.17's transformers flavour cannot serve a VLM: its ``transformers_model`` dict refuses a ``processor`` key,
``processor=`` turns pyfunc off ("the model has been saved with a 'processor' argument supplied"), a pipeline is
refused for a model saved with a processor, and an ``image-text-to-text`` pipeline is not among its tasks. So a VLM
version's ``MLmodel`` (written by :func:`mergelab.platform.mlmodel.write_mlmodel`) names this module as its
``loader_module`` with ``data: .``: MLflow calls :func:`_load_pyfunc` on the version's own directory (the merge
run's ``merged/``, no copy), which loads the weights and the processor with :func:`mergelab.hf.load_model` (it
knows the processors transformers cannot rebuild without torchvision) and answers with mergelab's generation runner
(the model's chat template, greedy decoding), exactly as ``mergelab eval`` does::

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict({"image": "chart.png", "question": "What is the largest bar?"})        # -> ["..."]
    model.predict(pd.DataFrame({"image": [img1, img2], "question": [q1, q2]}))          # -> ["...", "..."]

Rows are ``{image, question}``: ``image`` a PIL image, a file path, raw image bytes or base64-encoded bytes (what a
JSON request carries), or None for a text-only question. Columns and rows may also come as numpy arrays, as MLflow's
scoring server hands over a JSON request's ``inputs``. A served model (``mlflow models serve``: MLflow marks its
process with ``_MLFLOW_IS_IN_SERVING_ENVIRONMENT``) reads no image files: a request naming a path on the server is
refused, so only the image data sent is seen. Options: ``max_new_tokens`` (32) and ``batch_size`` (8)
at load time (``model_config``) or per call (``params``, declared in the version's signature: MLflow drops
undeclared ones); ``device`` (``cpu``; ``auto`` picks CUDA when present) and ``dtype`` (the checkpoint's) at load
time only.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mergelab.evaluators.loaders import open_image
from mergelab.evaluators.runner import build_prompt, generate
from mergelab.hf import load_model
from mergelab.platform.mlmodel import VLM_OPTIONS

DEFAULTS: dict[str, Any] = VLM_OPTIONS
"""Options and their defaults (``model_config`` / ``params`` keys), as the version's ``MLmodel`` lists them."""

LOAD_KEYS = ("device", "dtype")
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
"""Set to ``true`` by MLflow's scoring server (``mlflow models serve``) in the process that loads the model."""


def serving() -> bool:
    """Whether this process is MLflow's scoring server (a request's image paths are then refused)."""
    return os.environ.get(SERVING_ENV, "").strip().lower() in ("true", "1")


def to_image(value: Any, *, paths: bool = True) -> Image.Image | None:
    """One row's image as RGB: a PIL image, a path (when ``paths``), raw bytes or base64 text; None (or NaN) for no
    image.

    Raises:
        ValueError: a string that is neither an existing file (or ``paths`` is off) nor base64 image data, or bytes
            that are no image.
    """
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, Image.Image):
        return open_image(value)
    if paths and (isinstance(value, os.PathLike)
                  or (isinstance(value, str) and len(value) < 4096 and Path(value).is_file())):
        return open_image(Path(value))
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            what = "neither an existing file nor base64 image data" if paths else (
                "not base64 image data (a served model reads no image files: send the image's bytes as base64)")
            raise ValueError(f"image {value[:60]!r}: {what}") from None
    if isinstance(value, (bytes, bytearray)):
        try:
            return open_image(Image.open(io.BytesIO(value)))
        except OSError as e:  # PIL's UnidentifiedImageError, a truncated file
            raise ValueError(f"image of {len(value)} bytes: not a readable image ({e})") from None
    raise ValueError(f"image of type {type(value).__name__}: expected a PIL image, a path, bytes or base64 text")


def _plain(value: Any) -> Any:
    """A numpy array or scalar (MLflow's scoring server parses a JSON request's ``inputs`` into them) as the plain
    Python list or value; anything else as it is."""
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "tolist") or isinstance(value, Image.Image):
        return value
    return value.tolist()


def rows_of(model_input: Any) -> list[dict[str, Any]]:
    """``{image, question}`` rows from a DataFrame, one dict, a dict of columns, or a list of dicts or strings
    (numpy arrays in place of lists and strings included).

    Raises:
        ValueError: a row without a question.
    """
    model_input = _plain(model_input)
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        rows: list[Any] = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):
        cols = {k: _plain(v) for k, v in model_input.items()}
        q = cols.get("question")
        if isinstance(q, Sequence) and not isinstance(q, str):  # a dict of columns
            rows = [{k: (v[i] if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) else v)
                     for k, v in cols.items()} for i in range(len(q))]
        else:
            rows = [cols]
    elif isinstance(model_input, str):
        rows = [{"question": model_input}]
    else:
        rows = [{k: _plain(v) for k, v in r.items()} if isinstance(r, Mapping) else {"question": _plain(r)}
                for r in model_input]
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("question"), str):
            raise ValueError(f"row {i}: no 'question' text (rows are {{image, question}})")
        out.append({"image": r.get("image"), "question": r["question"]})
    return out


class VLMPyfunc:
    """A loaded VLM and its processor answering ``{image, question}`` rows (MLflow's pyfunc model protocol).

    Args:
        model_dir: the checkpoint directory (``config.json``, safetensors, processor files).
        config: options (see :data:`DEFAULTS`).
    """

    def __init__(self, model_dir: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> None:
        self.config = {**DEFAULTS, **(config or {})}
        self.model, self.processor = load_model(model_dir, device=self.config["device"], dtype=self.config["dtype"])
        self.model_type = str(getattr(self.model.config, "model_type", ""))

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[str]:
        """The model's answer to each row, in order (greedy decoding with the model's chat template).

        Args:
            model_input: rows (:func:`rows_of`).
            params: per-call ``max_new_tokens`` / ``batch_size``.

        Returns:
            One answer per row.
        """
        given = {k: v for k, v in (params or {}).items() if v is not None and k not in LOAD_KEYS}
        opts = {**self.config, **given}
        rows = rows_of(model_input)
        paths = not serving()
        images = [to_image(r["image"], paths=paths) for r in rows]
        answers: list[str] = [""] * len(rows)
        for with_image in (True, False):  # a generation batch never mixes rows with and without an image
            idx = [i for i, im in enumerate(images) if (im is not None) == with_image]
            if not idx:
                continue
            prompts = [build_prompt(self.processor, rows[i]["question"], with_image=with_image,
                                    model_type=self.model_type) for i in idx]
            texts = generate(self.model, self.processor, prompts, [images[i] for i in idx] if with_image else None,
                             batch_size=int(opts["batch_size"]), max_new_tokens=int(opts["max_new_tokens"]))
            for i, text in zip(idx, texts, strict=True):
                answers[i] = text
        return answers


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> VLMPyfunc:
    """MLflow's entry point (``loader_module``): the model in ``data_path``, the version's own directory."""
    return VLMPyfunc(data_path, model_config)
