"""Procedural image, audio and video tasks for the omni benchmark, and the cross-modal test sets.

Every sample is a small JSON-able record (:class:`OmniSample`): the question, the answer, and the *meta* of each
medium it carries; the media are rendered on demand and deterministically from the meta (:func:`render_image`,
:func:`render_audio`, :func:`render_video`; numpy and PIL only, no audio or video library).

Media (one scene draws all three; a task keeps the ones it needs):

* image, 112x112: one square, circle or triangle of one of 4 colours on white;
* audio, 1 s at 16 kHz: 2-4 beeps of 120 ms whose pitch steps up (``rising``) or down (``falling``);
* video, 8 frames of 56x56: a white square on black moving left, right, up or down, ``fast`` or ``slow``.

Single-modality tasks (each question names its answer words, and no two modalities share an answer word, so a
merged model cannot answer one modality's question with another's vocabulary): ``image_color``, ``image_shape``,
``audio_pitch``, ``audio_beeps``, ``video_motion``, ``video_speed`` (:data:`TASKS`).

Cross-modal sets (never trained on; every item carries all three media and asks about one or two of them):

* ``music_avqa`` (MUSIC-AVQA style): short-word answers, scored by exact match after EvalAI answer normalisation;
* ``avqa`` (AVQA style): four lettered options, scored on the first character of the answer (the choice letter).

Both record a question type (the modality asked about, or ``composite`` for a question that needs two) for the
per-type breakdown. Splits are disjoint by scene (a hash of the scene's meta decides the split).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mergelab.bench.omni.modeling import SAMPLE_RATE, VIDEO_FRAMES, VIDEO_SIZE

IMAGE_SIDE = 112
COLORS: dict[str, tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
                                           "yellow": (230, 200, 20)}
SHAPES = ("square", "circle", "triangle")
PITCH = ("rising", "falling")
BEEPS = ("2", "3", "4")
MOTION = ("left", "right", "up", "down")
SPEED = ("fast", "slow")
MODALITIES = ("image", "audio", "video")

TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "image_color": ("image", "what color is the shape?", tuple(COLORS)),
    "image_shape": ("image", "which shape is in the picture?", SHAPES),
    "audio_pitch": ("audio", "is the pitch rising or falling?", PITCH),
    "audio_beeps": ("audio", "how many beeps are there?", BEEPS),
    "video_motion": ("video", "which way does the square move?", MOTION),
    "video_speed": ("video", "does the square move fast or slow?", SPEED),
}
"""task -> (modality, question, answer words)."""

CROSS_SETS = ("music_avqa", "avqa")
"""The cross-modal test sets."""

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}

AVQA_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass
class OmniSample:
    """One item: a question about the media it carries.

    Attributes:
        id: unique within a split.
        task: a :data:`TASKS` name, ``music_avqa`` or ``avqa``.
        qtype: question type for the breakdown (the task for single-modality items).
        question: the text after the media.
        answer: the reference answer (a word, a digit, or a choice letter).
        scene: the meta of each medium (``image``, ``audio``, ``video``) the item carries.
        choices: option words of an AVQA-style item (the letter ``A`` is the first).
    """

    id: str
    task: str
    qtype: str
    question: str
    answer: str
    scene: dict[str, dict[str, Any]]
    choices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.scene)

    def only(self, modalities: Sequence[str]) -> OmniSample:
        """The same item with only the media in ``modalities`` (how a single-modality model is scored)."""
        return OmniSample(self.id, self.task, self.qtype, self.question, self.answer,
                          {m: v for m, v in self.scene.items() if m in modalities}, self.choices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_scene(rng: random.Random) -> dict[str, dict[str, Any]]:
    """Random meta of one image, one audio clip and one video clip."""
    size = rng.randint(36, 56)
    image = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": size,
             "x": rng.randint(4, IMAGE_SIDE - size - 4), "y": rng.randint(4, IMAGE_SIDE - size - 4)}
    n = int(rng.choice(BEEPS))
    direction = rng.choice(PITCH)
    f0 = rng.uniform(300.0, 500.0)
    step = rng.uniform(1.25, 1.45)
    freqs = [f0 * step**i for i in range(n)]
    audio = {"beeps": n, "pitch": direction, "freqs": [round(f, 1) for f in (freqs if direction == "rising"
                                                                            else freqs[::-1])],
             "start": round(rng.uniform(0.02, 0.08), 3), "gap": round(rng.uniform(0.09, 0.12), 3)}
    motion = rng.choice(MOTION)
    speed = rng.choice(SPEED)
    video = {"motion": motion, "speed": speed, "side": rng.randint(10, 14), "offset": rng.randint(-6, 6),
             "shift": rng.randint(-3, 3)}
    return {"image": image, "audio": audio, "video": video}


def render_image(meta: dict[str, Any]) -> Image.Image:
    """The 112x112 picture of an image meta."""
    img = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x, y, s = meta["x"], meta["y"], meta["size"]
    fill = COLORS[meta["color"]]
    if meta["shape"] == "square":
        draw.rectangle([x, y, x + s, y + s], fill=fill)
    elif meta["shape"] == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=fill)
    else:
        draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def render_audio(meta: dict[str, Any]) -> np.ndarray:
    """The 1-second float32 waveform of an audio meta: 120 ms sine beeps with 5 ms ramps."""
    out = np.zeros(SAMPLE_RATE, dtype=np.float32)
    n_beep = int(0.12 * SAMPLE_RATE)
    ramp = np.minimum(1.0, np.minimum(np.arange(n_beep), np.arange(n_beep)[::-1]) / (0.005 * SAMPLE_RATE))
    t = np.arange(n_beep) / SAMPLE_RATE
    for i, f in enumerate(meta["freqs"]):
        start = int((meta["start"] + i * (0.12 + meta["gap"])) * SAMPLE_RATE)
        out[start : start + n_beep] += (0.5 * np.sin(2 * np.pi * f * t) * ramp)[: SAMPLE_RATE - start]
    return out


_STEP = {"fast": 5.0, "slow": 2.5}
_DIRS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def render_video(meta: dict[str, Any]) -> np.ndarray:
    """The ``(8, 56, 56, 3)`` uint8 frames of a video meta: a square moving from near one side to the other."""
    frames = np.zeros((VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)
    side, step = meta["side"], _STEP[meta["speed"]]
    dx, dy = _DIRS[meta["motion"]]
    travel = step * (VIDEO_FRAMES - 1)
    centre = (VIDEO_SIZE - side) / 2
    for k in range(VIDEO_FRAMES):
        along = -travel / 2 + step * k + meta.get("shift", 0)
        x = centre + dx * along + (meta["offset"] if dx == 0 else 0)
        y = centre + dy * along + (meta["offset"] if dy == 0 else 0)
        x0, y0 = int(round(x)), int(round(y))
        frames[k, max(0, y0) : y0 + side, max(0, x0) : x0 + side] = 255
    return frames


def render(sample: OmniSample) -> dict[str, Any]:
    """The processor's media arguments for ``sample``: ``images``, ``audio``, ``videos`` (lists of one, or absent)."""
    out: dict[str, Any] = {}
    if "image" in sample.scene:
        out["images"] = [render_image(sample.scene["image"])]
    if "audio" in sample.scene:
        out["audio"] = [render_audio(sample.scene["audio"])]
    if "video" in sample.scene:
        out["videos"] = [render_video(sample.scene["video"])]
    return out


def scene_answer(task: str, scene: dict[str, dict[str, Any]]) -> str:
    """The answer of single-modality ``task`` about ``scene``."""
    modality = TASKS[task][0]
    key = task.split("_", 1)[1]
    value = scene[modality]["beeps" if key == "beeps" else key]
    return str(value)


def split_of(scene: dict[str, Any]) -> str:
    """``train``, ``val`` or ``test`` by a hash of the scene (disjoint across splits, stable across runs)."""
    h = int(hashlib.sha256(json.dumps(scene, sort_keys=True).encode()).hexdigest()[:8], 16) / 16**8
    acc = 0.0
    for name, share in SPLITS.items():
        acc += share
        if h < acc:
            return name
    return "test"


def _scenes(split: str, n: int, seed: int, salt: str, keep: Sequence[str] = MODALITIES) -> list[dict[str, Any]]:
    """``n`` scenes (only the media in ``keep``) whose kept media hash into ``split``."""
    rng = random.Random(f"{salt}:{seed}")
    out: list[dict[str, Any]] = []
    while len(out) < n:
        scene = {m: v for m, v in draw_scene(rng).items() if m in keep}
        if split_of(scene) == split:
            out.append(scene)
    return out


TRAIN_LEADS = ("", "", "look and listen: ", "in this clip, ", "answer in one word: ", "tell me, ")
"""Leads an expert's training questions start with (drawn uniformly): none, or a short phrase, so that an expert
answers its question inside a longer sentence. None of them is a cross-modal set's clause (those name another
modality: "while the square moves, ...")."""


def task_samples(task: str, split: str, n: int, seed: int = 0, *, leads: bool = False) -> list[OmniSample]:
    """``n`` items of single-modality ``task`` (only its own medium) from ``split``; ``leads``: each question
    starts with one of :data:`TRAIN_LEADS` (the experts' training sets)."""
    modality, question, _ = TASKS[task]
    rng = random.Random(f"{task}:leads:{seed}")
    return [OmniSample(f"{task}-{split}-{i}", task, task, (rng.choice(TRAIN_LEADS) if leads else "") + question,
                       scene_answer(task, scene), scene)
            for i, scene in enumerate(_scenes(split, n, seed, task, keep=(modality,)))]


def with_other_media(samples: Sequence[OmniSample], share: float, seed: int = 0) -> list[OmniSample]:
    """``samples`` where a ``share`` of the items also carry the other modalities' media, drawn from unrelated
    scenes (the question and answer stay about the item's own medium): an expert trained on them has seen the other
    towers' tokens in its prompts, as the merged model's prompts hold them."""
    rng = random.Random(f"other-media:{seed}")
    out = []
    for s in samples:
        if rng.random() < share:
            other = draw_scene(rng)
            scene = {m: s.scene.get(m, other[m]) for m in MODALITIES}
            s = OmniSample(s.id, s.task, s.qtype, s.question, s.answer, scene, s.choices)
        out.append(s)
    return out


def as_lettered(samples: Sequence[OmniSample], share: float, seed: int = 0) -> list[OmniSample]:
    """``samples`` where a ``share`` of the single-modality items are asked with their task's answer words as
    lettered options (:func:`lettered_question`) and answered by the letter: an expert trained on them picks the
    letter of what its medium shows. The question keeps its lead and never names another modality (the AVQA-style
    set's clause)."""
    rng = random.Random(f"lettered:{seed}")
    out = []
    for s in samples:
        if s.task in TASKS and not s.choices and rng.random() < share:
            question, answer, options = lettered_question(s.question, s.task, s.answer)
            s = OmniSample(s.id, s.task, s.qtype, question, answer, s.scene, options)
        out.append(s)
    return out


_MUSIC_TEMPLATES: dict[str, tuple[str, str]] = {
    "image_color": ("image", "while the beeps sound, what color is the shape in the picture?"),
    "image_shape": ("image", "while the square moves, which shape is in the picture?"),
    "audio_pitch": ("audio", "while the square moves, is the pitch rising or falling?"),
    "audio_beeps": ("audio", "while the square moves, how many beeps are there?"),
    "video_motion": ("video", "while the beeps sound, which way does the square move?"),
    "video_speed": ("video", "while the beeps sound, does the square move fast or slow?"),
}


def vertical(scene: dict[str, dict[str, Any]], rng: random.Random) -> dict[str, dict[str, Any]]:
    """``scene`` with the square moving up or down (the scenes of ``composite`` questions: yes and no balanced)."""
    return {**scene, "video": {**scene["video"], "motion": rng.choice(("up", "down"))}}


def ask(qtype: str, scene: dict[str, dict[str, Any]], *, lettered: bool) -> tuple[str, str, tuple[str, ...]]:
    """A cross-modal question of type ``qtype`` about ``scene``: ``(question, answer, options)``.

    Open form (MUSIC-AVQA style): the fact's question with a clause naming another modality, answered by a word.
    Lettered form (AVQA style): the same question with the fact's answer words (2-4) as lettered options, always in
    the order of :data:`TASKS` (a fixed option list per question type), answered by the letter. ``composite`` (open only) needs audio and video together: does the
    pitch go the way the square moves (rising = up); its scenes move the square up or down (:func:`vertical`).
    """
    if qtype == "composite":
        same = (scene["audio"]["pitch"] == "rising") == (scene["video"]["motion"] == "up")
        return "do the pitch and the square go the same way?", "yes" if same else "no", ()
    stem, answer = _MUSIC_TEMPLATES[qtype][1], scene_answer(qtype, scene)
    if not lettered:
        return stem, answer, ()
    return lettered_question(stem, qtype, answer)


def lettered_question(stem: str, task: str, answer: str) -> tuple[str, str, tuple[str, ...]]:
    """``stem`` with ``task``'s answer words as lettered options in the order of :data:`TASKS` and the AVQA
    instruction: ``(question, letter of answer, options)``."""
    options = TASKS[task][2]
    text = stem + " " + " ".join(f"{'ABCD'[k]}. {w}" for k, w in enumerate(options)) + " " + AVQA_SUFFIX
    return text, "ABCD"[options.index(answer)], options


def cross_samples(which: str, split: str, n: int, seed: int = 0) -> list[OmniSample]:
    """``n`` items of cross-modal set ``which`` (``music_avqa`` or ``avqa``): every item carries all three media.

    Question types cycle over the six single-modality facts (asked with a clause naming another modality) and, for
    ``music_avqa``, the ``composite`` type that needs audio and video together (a stretch row: zero-shot
    composition).
    """
    if which not in CROSS_SETS:
        raise ValueError(f"unknown cross-modal set {which!r}; use one of {CROSS_SETS}")
    types = list(_MUSIC_TEMPLATES) + (["composite"] if which == "music_avqa" else [])
    rng = random.Random(f"{which}:options:{seed}")
    out = []
    for i, scene in enumerate(_scenes(split, n, seed, which)):
        qtype = types[i % len(types)]
        scene = vertical(scene, rng) if qtype == "composite" else scene
        question, answer, options = ask(qtype, scene, lettered=which == "avqa")
        out.append(OmniSample(f"{which}-{split}-{i}", which, qtype, question, answer, scene, options))
    return out


def describe(scene: dict[str, dict[str, Any]], modalities: Sequence[str]) -> str:
    """The scene in words (for the base's text-only *described items*)."""
    parts = []
    if "image" in modalities:
        im = scene["image"]
        parts.append(f"The picture shows a {im['color']} {im['shape']}.")
    if "audio" in modalities:
        au = scene["audio"]
        parts.append(f"There are {au['beeps']} beeps and the pitch is {au['pitch']}.")
    if "video" in modalities:
        vi = scene["video"]
        parts.append(f"The square moves {vi['motion']} and it is {vi['speed']}.")
    return " ".join(parts)


def described_samples(n: int, seed: int = 0) -> list[OmniSample]:
    """Text-only items for the base: the scene in words for 1-3 modalities, then a single-modality, cross-modal
    (open or lettered) or composite question about it. They teach the LLM the question forms and answer words,
    never the media."""
    rng = random.Random(f"described:{seed}")
    kinds = [(t, "task") for t in TASKS] + [(t, "open") for t in _MUSIC_TEMPLATES] + \
        [(t, "lettered") for t in _MUSIC_TEMPLATES] + [("composite", "open")]
    out = []
    for i, scene in enumerate(_scenes("train", n, seed, "described")):
        qtype, form = rng.choice(kinds)
        scene = vertical(scene, rng) if qtype == "composite" else scene
        if form == "task":
            question, answer, options = TASKS[qtype][1], scene_answer(qtype, scene), ()
        else:
            question, answer, options = ask(qtype, scene, lettered=form == "lettered")
        needed = {TASKS[qtype][0]} if qtype in TASKS else {"audio", "video"}
        shown = sorted(needed | set(rng.sample(MODALITIES, rng.randint(0, 2))), key=MODALITIES.index)
        out.append(OmniSample(f"described-{i}", "described", qtype, describe(scene, shown) + " " + question,
                              answer, {}, options))
    return out


def corpus(seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: every question form and answer word."""
    lines = [q for _, q, _ in TASKS.values()] + [q for _, q in _MUSIC_TEMPLATES.values()] + list(TRAIN_LEADS)
    lines += [w for _, _, ws in TASKS.values() for w in ws] + ["yes", "no", "A", "B", "C", "D", AVQA_SUFFIX]
    lines += [s.question for s in described_samples(200, seed)]
    return lines
