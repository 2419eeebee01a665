"""Writing and reading the offline benchmark's splits: PNG images plus one JSONL file per split.

Layout (documented in ``docs/benchmark-data.md``)::

    <root>/MANIFEST.json                                   # generator version, seed, counts, sha256 of each JSONL
    <root>/<task>/<variant>/<split>.jsonl                  # one JSON object per line
    <root>/<task>/<variant>/images/<split>/<id>.png        # 112x112 RGB

Each JSONL line holds ``id, task, variant, split, image, question, answer, answers, metric, meta``, with ``image``
relative to the JSONL's directory. Writes are atomic: a split is built in a hidden temporary directory beside its
final place and moved in when complete, the JSONL last (it is the commit marker), and the manifest is replaced
atomically after each split. :func:`ensure_data` is idempotent and takes a file lock, so concurrent workers can
call it on one root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mergelab._files import iter_jsonl
from mergelab.bench.tasks import DEFAULT_SIZES, GENERATOR_VERSION, TASKS, generate
from mergelab.bench.tasks.common import IMAGE_SIZE, METRICS, SPLITS, VARIANTS, Sample

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
EVAL_SPLITS = ("val", "test")
"""What :func:`ensure_data` writes by default; training streams :func:`~mergelab.bench.tasks.generate` instead."""
FIELDS = ("id", "task", "variant", "split", "image", "question", "answer", "answers", "metric", "meta")


def default_data_root() -> Path:
    """``$MERGELAB_DATA`` when set, else ``~/.cache/mergelab/data``."""
    env = os.environ.get("MERGELAB_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/mergelab/data").expanduser()


def split_path(root: str | os.PathLike[str], task: str, variant: str, split: str) -> Path:
    """``<root>/<task>/<variant>/<split>.jsonl``."""
    return Path(root) / task / variant / f"{split}.jsonl"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_samples(samples: Sequence[Sample]) -> tuple[str, str, str]:
    if not samples:
        raise ValueError("write_split got no samples (cannot tell task/variant/split)")
    first = samples[0]
    where = (first.task, first.variant, first.split)
    seen: set[str] = set()
    for s in samples:
        if (s.task, s.variant, s.split) != where:
            raise ValueError(f"sample {s.id!r} is {s.task}/{s.variant}/{s.split}, expected {'/'.join(where)}")
        if not s.id or any(c in s.id for c in "/\\") or s.id.startswith("."):
            raise ValueError(f"sample id {s.id!r} is not a safe file name")
        if s.id in seen:
            raise ValueError(f"duplicate sample id {s.id!r} in {'/'.join(where)}")
        if s.metric not in METRICS:
            raise ValueError(f"sample {s.id!r}: unknown metric {s.metric!r}; known: {METRICS}")
        seen.add(s.id)
    return where


def write_split(samples: Sequence[Sample], root: str | os.PathLike[str] | None = None) -> Path:
    """Write one split's images and JSONL atomically, replacing any previous version.

    Args:
        samples: Samples of a single (task, variant, split), with unique ids.
        root: Data root (default :func:`default_data_root`).

    Returns:
        The path of the written JSONL.

    Raises:
        ValueError: Mixed splits, duplicate or unsafe ids, or an unknown metric (the message names the sample).
    """
    task, variant, split = _check_samples(samples)
    root = Path(root) if root is not None else default_data_root()
    final = split_path(root, task, variant, split)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{split}-{uuid.uuid4().hex}"
    old = final.parent / f".old-{split}-{uuid.uuid4().hex}"
    images = final.parent / "images" / split
    try:
        (tmp / "images").mkdir(parents=True)
        with open(tmp / "split.jsonl", "w", encoding="utf-8") as out:
            for s in samples:
                s.image.save(tmp / "images" / f"{s.id}.png", format="PNG", compress_level=1)
                rec = {
                    "id": s.id,
                    "task": s.task,
                    "variant": s.variant,
                    "split": s.split,
                    "image": f"images/{split}/{s.id}.png",
                    "question": s.question,
                    "answer": s.answer,
                    "answers": list(s.answers),
                    "metric": s.metric,
                    "meta": s.meta,
                }
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        images.parent.mkdir(exist_ok=True)
        if images.exists():
            images.rename(old)
        (tmp / "images").rename(images)
        os.replace(tmp / "split.jsonl", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` of a split's JSONL, checking every field and the metric.

    ``image`` may be absent or null: a text-only item (the files :func:`write_split` writes always have one).

    Raises:
        FileNotFoundError: The JSONL is missing (the message says how to build it).
        ValueError: A line is not JSON, lacks a field or names an unknown metric (the message names ``file:line``
            and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such split; build it with `mergelab bench build` or mergelab.bench.data.ensure_data()"
        )
    for n, rec in iter_jsonl(path, "benchmark split"):
        missing = [k for k in FIELDS if k not in rec and k != "image"]
        if missing:
            also = f" (and {missing[1:]})" if len(missing) > 1 else ""
            raise ValueError(f"{path}:{n}: missing field {missing[0]!r}{also}")
        if rec["metric"] not in METRICS:
            raise ValueError(f"{path}:{n}: unknown metric {rec['metric']!r}; expected one of {METRICS}")
        yield n, rec


def read_split(
    task: str,
    variant: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    load_images: bool = True,
) -> list[Sample]:
    """Read a written split back into :class:`Sample` objects: the one reader of the benchmark's JSONL.

    Args:
        task: One of ``TASKS``.
        variant: ``"generic"`` or ``"shifted"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: Data root (default :func:`default_data_root`).
        limit: Read only the first ``limit`` samples.
        load_images: Load every image as RGB (the default); False keeps each image's path (checked to exist),
            for readers that open images one batch at a time (the evaluators).

    Raises:
        FileNotFoundError: The JSONL or an image is missing (the message names the path).
        ValueError: A malformed line (see :func:`iter_records`).
    """
    root = Path(root) if root is not None else default_data_root()
    path = split_path(root, task, variant, split)
    out: list[Sample] = []
    for _, rec in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        image: Image.Image | Path | None = None
        if rec.get("image"):
            image = path.parent / rec["image"]
            if not image.is_file():
                raise FileNotFoundError(f"{path}: image {rec['image']!r} of sample {rec['id']!r} is missing")
            if load_images:
                with Image.open(image) as im:
                    image = im.convert("RGB")
        out.append(
            Sample(
                id=str(rec["id"]),
                task=rec["task"],
                variant=rec["variant"],
                split=rec["split"],
                image=image,
                question=str(rec["question"]),
                answer=rec["answer"],
                answers=[str(a) for a in rec["answers"]],
                metric=rec["metric"],
                meta=rec["meta"],
            )
        )
    return out


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The root's ``MANIFEST.json`` as a dict, or None when absent.

    Raises:
        ValueError: The manifest is not valid JSON (names the file).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}); delete it to rebuild the data") from None


def _write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<root>/.lock`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_current(root: Path, rel: str, entry: Mapping[str, Any] | None, count: int) -> bool:
    if not entry or entry.get("count") != count:
        return False
    path = root / rel
    images = path.parent / "images" / path.stem
    if not path.is_file() or not images.is_dir() or sha256_file(path) != entry.get("sha256"):
        return False
    return sum(1 for p in images.iterdir() if p.suffix == ".png") == count


def ensure_data(
    root: str | os.PathLike[str] | None = None,
    tasks: Iterable[str] = TASKS,
    variants: Iterable[str] = VARIANTS,
    seed: int = 0,
    *,
    splits: Iterable[str] = EVAL_SPLITS,
    sizes: Mapping[str, int] | None = None,
    progress: bool = False,
) -> Path:
    """Write every missing or stale split under ``root`` and return ``root`` (idempotent).

    A split is kept when the manifest lists it with the requested count and its JSONL's SHA-256 and image count
    still match; anything else is regenerated. Data of another generator version is rebuilt.

    Args:
        root: Data root (default :func:`default_data_root`).
        tasks: Tasks to write.
        variants: Variants to write.
        seed: Data seed; one root holds one seed.
        splits: Splits to write (default ``("val", "test")``; add ``"train"`` for file-based training, which can
            also stream :func:`~mergelab.bench.tasks.generate` directly).
        sizes: Samples per split, overriding :data:`~mergelab.bench.tasks.DEFAULT_SIZES` for the named splits.

    Returns:
        The data root.

    Raises:
        ValueError: ``root`` holds data of another seed (the message names its manifest), or a bad name.
    """
    root = Path(root) if root is not None else default_data_root()
    tasks, variants, splits = ((x,) if isinstance(x, str) else tuple(x) for x in (tasks, variants, splits))
    for name, given, known in (
        ("task", tasks, TASKS),
        ("variant", variants, VARIANTS),
        ("split", splits, SPLITS),
    ):
        bad = [g for g in given if g not in known]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; known: {known}")
    want = {**DEFAULT_SIZES, **(sizes or {})}
    bad_sizes = {s: want.get(s) for s in splits if not isinstance(want.get(s), int) or want[s] < 1}
    if bad_sizes:
        raise ValueError(f"split size(s) must be positive integers, got {bad_sizes}")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        manifest = read_manifest(root)
        if manifest is not None and manifest.get("seed") != seed:
            raise ValueError(
                f"{root / MANIFEST}: data generated with seed {manifest.get('seed')}, asked for seed {seed}; "
                "use another root"
            )
        if manifest is None or manifest.get("generator_version") != GENERATOR_VERSION:
            manifest = {"format": FORMAT_VERSION, "generator_version": GENERATOR_VERSION, "seed": seed,
                        "image_size": IMAGE_SIZE, "splits": {}}  # fmt: skip
        jobs = [(t, v, s) for t in tasks for v in variants for s in splits]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="benchmark data", unit="split")
        for task, variant, split in jobs:
            rel = f"{task}/{variant}/{split}.jsonl"
            n = int(want[split])
            if not _is_current(root, rel, manifest["splits"].get(rel), n):
                path = write_split(generate(task, variant, split, n=n, seed=seed), root)
                manifest["splits"][rel] = {"task": task, "variant": variant, "split": split, "count": n,
                                           "sha256": sha256_file(path)}  # fmt: skip
                _write_manifest(root, manifest)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not (root / MANIFEST).is_file():
            _write_manifest(root, manifest)
    return root
