"""Loading and saving real and tiny ``transformers`` models together with their processors.

One place knows the quirks of transformers 5 on machines without torchvision:

* Qwen2-VL, Qwen2.5-VL and SmolVLM processors cannot be built or saved the normal way because their video processor
  needs torchvision (which families, and the image processor to rebuild them with: :mod:`mergelab.families`). :func:`no_video` subclasses the processor to accept ``video_processor=None``; on save the image
  processor, tokenizer and chat template are written separately and on load the processor is rebuilt from them.
* Weights are read and written as safetensors only (never pickle); ``trust_remote_code`` is off unless asked.
* A directory holding a peft LoRA adapter (``adapter_config.json``) loads as its base with the adapter merged in.

Used by the evaluators, the benchmark zoo and the platform::

    model, processor = load_model("ckpt/qwen2-vl", device="auto", dtype="bfloat16")
    save_model(model, processor, "out/merged")      # atomic: written to a temporary sibling, then renamed
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

from mergelab._device import resolve_device
from mergelab._dtypes import parse_dtype
from mergelab._files import read_json
from mergelab.families import family_for_model_type


def no_video(proc_cls: type) -> type:
    """``proc_cls`` accepting ``video_processor=None`` (transformers 5 video processors need torchvision).

    Args:
        proc_cls: a ``ProcessorMixin`` subclass such as ``transformers.Qwen2VLProcessor``.

    Returns:
        A subclass with the same name whose class check lets a missing video processor through.
    """
    cached = _NO_VIDEO_CLASSES.get(proc_cls)
    if cached is not None:
        return cached

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and "video" in argument_name:
            return None
        return proc_cls.check_argument_for_proper_class(self, argument_name, argument)

    sub = type(proc_cls.__name__, (proc_cls,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                               "__module__": proc_cls.__module__,
                                               "__doc__": proc_cls.__doc__})
    _NO_VIDEO_CLASSES[proc_cls] = sub
    return sub


_NO_VIDEO_CLASSES: dict[type, type] = {}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """None/"auto" -> the checkpoint's dtype ("auto"); a name such as "bfloat16" or "bf16" -> ``torch.bfloat16``
    (the names of :data:`mergelab._dtypes.DTYPES`)."""
    return parse_dtype(dtype) or "auto"


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, with a one-line error naming the file when absent or bad."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json (not a transformers checkpoint directory)")
    return read_json(cfg_file, "config.json")


def _import(dotted: str) -> Any:
    mod, _, name = dotted.rpartition(".")
    return getattr(__import__(mod, fromlist=[name]), name)


def _model_class(cfg: dict[str, Any], path: Path) -> Any:
    for arch in cfg.get("architectures") or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if cfg.get("vision_config") is not None:
        return transformers.AutoModelForImageTextToText
    if "model_type" not in cfg:
        raise ValueError(f"{path / 'config.json'}: neither 'architectures' nor 'model_type' given")
    return transformers.AutoModelForCausalLM


def _chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


def load_processor(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The processor (or tokenizer, for a text LM) saved beside a checkpoint.

    A family whose processor's video part needs torchvision (Qwen2-VL, Qwen2.5-VL, SmolVLM: the
    :class:`~mergelab.families.ProcessorFacts` of :mod:`mergelab.families`) has its processor rebuilt from the saved
    tokenizer, image processor and chat template with :func:`no_video`; other multimodal models use
    ``AutoProcessor``; text LMs ``AutoTokenizer``.

    Args:
        path: a checkpoint directory (``config.json`` plus tokenizer files).
        trust_remote_code: passed to the ``Auto*`` classes; off by default.
    """
    path = Path(path)
    cfg = read_config(path)
    family = family_for_model_type(str(cfg.get("model_type", "")))
    facts = family.processor if family is not None else None
    if facts is not None and facts.image_processor is not None and facts.processor_class is not None:
        ip_path, proc_name = facts.image_processor, facts.processor_class
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{path / 'preprocessor_config.json'}: missing image processor config")
        image_processor = _import(ip_path).from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        template = _chat_template(path) or getattr(tokenizer, "chat_template", None)
        if template is not None and getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = template
        proc_cls = no_video(getattr(transformers, proc_name))
        return proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                        chat_template=template)
    if cfg.get("vision_config") is not None or (path / "preprocessor_config.json").is_file():
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _adapter_base(path: Path) -> Path:
    acfg_file = path / "adapter_config.json"
    try:
        acfg = json.loads(acfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{acfg_file}: invalid JSON ({e})") from None
    base = acfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{acfg_file}: 'base_model_name_or_path' is empty; cannot find the adapter's base model")
    candidate = Path(base)
    if not candidate.is_absolute():
        candidate = (path / base).resolve()
    if not (candidate / "config.json").is_file():
        raise FileNotFoundError(f"{acfg_file}: base model {base!r} not found (looked for {candidate}/config.json)")
    return candidate


VERBOSE_ENV = "MERGELAB_VERBOSE"
"""Set (``mergelab -v``) to keep transformers' own progress bars and logs when models load."""


def verbose() -> bool:
    """Whether ``$MERGELAB_VERBOSE`` asks for transformers' own output."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers for the block unless :func:`verbose`: no per-load progress bar ("Loading weights", one
    per model, dozens per merge-and-evaluate) and only its errors logged; the previous settings come back after."""
    if verbose():
        yield
        return
    tlog = transformers.utils.logging
    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a checkpoint directory (or a LoRA adapter directory) and its processor, ready for generation.

    Args:
        path: a directory with ``config.json`` and safetensors weights, or a peft adapter directory whose
            ``base_model_name_or_path`` (absolute, or relative to the adapter directory) is such a checkpoint; the
            adapter is merged into the base (``merge_and_unload``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available).
        dtype: ``None``/``"auto"`` keeps the checkpoint's dtype; otherwise e.g. ``"bfloat16"``.
        trust_remote_code: allow custom modelling code from the checkpoint; off unless a config asks.

    Returns:
        ``(model, processor)``: the model in eval mode on ``device``; the processor (tokenizer for text LMs).

    Raises:
        FileNotFoundError: the directory, its config or its weights are missing.
        ValueError: the config cannot be parsed or names no known architecture.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():  # else peft would fall back to torch.load (pickle)
            raise FileNotFoundError(f"{path}: no adapter_model.safetensors (pickled adapters are never loaded)")
        base_path = _adapter_base(path)
        model, processor = load_model(base_path, device="cpu", dtype=dtype, trust_remote_code=trust_remote_code)
        from peft import PeftModel

        with quiet_transformers():
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        return model.to(resolve_device(device)).eval(), processor
    cfg = read_config(path)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors checkpoints are loaded)")
    cls = _model_class(cfg, path)
    with quiet_transformers():
        model = cls.from_pretrained(
            path,
            dtype=resolve_dtype(dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
        processor = load_processor(path, trust_remote_code=trust_remote_code)
    return model.to(resolve_device(device)).eval(), processor


def save_processor(processor: Any, path: str | os.PathLike[str]) -> None:
    """Write a processor or tokenizer into ``path`` so that :func:`load_processor` rebuilds it."""
    path = Path(path)
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if isinstance(processor, transformers.ProcessorMixin) and getattr(processor, "video_processor", None) is None \
            and tokenizer is not None and image_processor is not None:
        # transformers 5's stock save_pretrained fails without a video processor
        image_processor.save_pretrained(path)
        template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if template is not None and getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(path)
        if template is not None:
            (path / "chat_template.jinja").write_text(template)
        return
    processor.save_pretrained(path)


def save_model(model: Any, processor: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Save a model (safetensors) and its processor atomically.

    Everything is written into a temporary sibling directory that is renamed to ``path`` once complete, so a
    crash never leaves a half-written checkpoint behind.

    Args:
        model: a ``PreTrainedModel``.
        processor: its processor or tokenizer (may be None).
        path: the destination directory.
        overwrite: replace an existing ``path``; otherwise an existing destination is an error.

    Returns:
        The destination path.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            save_processor(processor, tmp)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing ``dst`` if it exists (rename-based)."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
