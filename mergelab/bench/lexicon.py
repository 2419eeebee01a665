"""Lexicon items: the tiny base's stand-in for the text pretraining of a real MLLM's language model.

A real base (Qwen2-VL, InternVL) has written every word of every benchmark answer many times before any expert is
fine-tuned: "pink", "90", "hexagon", a capital letter or a box's coordinates are ordinary outputs of its language
model. The zoo's base learns its language from the generic variants alone, so the shifted variants' answer words
(new colours, tens, polygon names, capitals, the shifted grid's box corners) are outputs it has only ever been
trained *not* to give. An expert then has to lift such a word from far below every other logit, and the cheapest
way, with nothing in its data saying when not to, is a push that does not depend on the prompt: the chart expert
that answers "90" to "what color is the square?" (``docs/benchmark-zoo.md``), which a merge carries into every
other task.

``lexicon_items`` makes text-only items (a blank image) that ask the model to write one answer word of the
benchmark, every variant's answers included: "say pink." -> "pink", "repeat: (375,125),(625,375)" ->
``<|box_start|>(375,125),(625,375)<|box_end|>``. They teach the language model to produce each word when asked to,
and nothing about the images: the shifted questions are never asked, so the base still scores near zero on them
(the experts' gains stay the benchmark's). ``ZooPlan.base_lexicon`` mixes them into the base's training set (off
by default: alone they do not stop the leaks).

``described_items`` go further and are what the zoo's base trains on (``ZooPlan.base_described``, 0.5 by default):
each training sample's scene in words before its own question, so the base knows what every question, shifted
ones included, asks for and which words answer it, without the visual skill.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mergelab.bench.tasks import TASK_SPECS
from mergelab.bench.tasks.common import blank, spoken

LEXICON_VERSION = 2
"""Bumped whenever the items change (part of the base's fingerprint when the lexicon is on)."""

TEMPLATES = ("say {}.", "repeat: {}", "write {}")
"""Prompts around the word; several, so that the model learns to copy the word rather than one prompt's answer."""



@dataclass(frozen=True)
class LexiconItem:
    """One text-only training item (the fields :func:`mergelab.bench.train.encode` reads)."""

    id: str
    question: str
    answer: str
    image: Image.Image = field(compare=False, repr=False)


def answer_words(samples: Iterable[Any]) -> list[str]:
    """The distinct ``answer`` strings of ``samples``, sorted (the lexicon's vocabulary)."""
    return sorted({str(s.answer) for s in samples})


def lexicon_items(words: Sequence[str], n: int, seed: int = 0) -> list[LexiconItem]:
    """``n`` items cycling through ``words`` (each word ``n / len(words)`` times, give or take one), each with a
    template drawn at random; deterministic in ``seed``.

    Raises:
        ValueError: on no words, an empty word, or ``n < 1``.
    """
    if not words:
        raise ValueError("lexicon_items: no words")
    if n < 1:
        raise ValueError(f"lexicon_items: n must be >= 1, got {n!r}")
    empty = [w for w in words if not spoken(w).strip()]
    if empty:
        raise ValueError(f"lexicon_items: empty word {empty[0]!r}")
    rng = random.Random(f"lexicon-{LEXICON_VERSION}-{seed}")
    order = list(words)
    image = blank()[0]
    items: list[LexiconItem] = []
    for i in range(n):
        if i % len(order) == 0:
            rng.shuffle(order)
        word = order[i % len(order)]
        question = rng.choice(TEMPLATES).format(spoken(word))
        items.append(LexiconItem(f"lexicon-{i:05d}", question, word, image))
    return items


# ------------------------------------------------------------------------------------------- described items

def describe(sample: Any) -> str:
    """The scene of a benchmark sample in words, enough to answer its question without the image.

    Each task states its own description (``TaskSpec.describe`` in its module under :mod:`mergelab.bench.tasks`);
    the question itself is the sample's own, so a model trained on ``"{description} {question}"`` learns what each
    question asks for and which words answer it (the language side of the task), not how to read it off an image.

    Raises:
        ValueError: for a task that has no description.
    """
    spec = TASK_SPECS.get(sample.task)
    if spec is None or spec.describe is None:
        raise ValueError(f"describe: task {sample.task!r} of sample {getattr(sample, 'id', '?')!r} has no description")
    return spec.describe(sample)


def described_items(samples: Sequence[Any]) -> list[LexiconItem]:
    """Text-only copies of ``samples`` (a blank image): ``"{describe(s)} {s.question}"`` -> ``s.answer``."""
    image = blank()[0]
    return [LexiconItem(f"described-{s.id}", f"{describe(s)} {s.question}", s.answer, image) for s in samples]
