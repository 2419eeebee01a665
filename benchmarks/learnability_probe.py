"""What the benchmark's tiny Qwen2-VL can learn from scratch in a CPU budget: one-skill probes.

Each probe trains a fresh model of the zoo's size (:class:`mergelab.bench.modeling.TinyQwen2VLConfig`) on one
narrow visual skill for ``--steps`` steps and prints the greedy accuracy on 200 held-out items. It separates what
the model learns from pooled image features (a single salient object's colour or filled shape: the answer changes
the mean of the image tokens) from what needs the language model to *select* one image token and read fine detail
from it (a digit glyph), and whether training the vision tower from scratch helps or hurts.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/learnability_probe.py                       # every probe, 200 steps
    .venv/bin/python benchmarks/learnability_probe.py --probe digit-fixed --steps 1500 --lr 2e-3 --train lm

Probes (items are drawn on 112x112 white images, one per 28-px cell of the 4x4 grid unless said otherwise):

* ``colour``: "what color is the square?", one 24-px square of 6 colours anywhere in the image;
* ``shape``: "what shape is it?", one 22-24-px black filled circle / square / triangle / diamond in a random cell;
* ``digit``: "what is written in the image?", one digit of the benchmark's bitmap font (15x21 px) in a random cell;
* ``digit-fixed``: the same digit always in the top-left cell (jitter of 2 px);
* ``digit-large``: one digit drawn at 8 px per font dot (40x56 px) in the middle of the image (jitter of 4 px);
* ``letter-large``: the same with the ten capitals of the shifted OCR variant;
* ``vqa-small`` / ``vqa-large``: one shape (24-40 px / 40-56 px) anywhere, in 6 colours, with VQA's three
  questions ("what color is the {shape}?", "what shape is the {colour} object?", "is there a {colour} {shape}?");
* ``ground-1`` / ``ground-3``: grounding's prompt and cell-box answer for one object / 2-4 objects (the target
  named by colour and shape) on the coordinate canvas.

``--train all`` updates every parameter (vision tower included); ``--train lm`` only the language model and the LM
head (the vision tower keeps its random initialisation, like a frozen encoder).
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

from mergelab.bench import modeling
from mergelab.bench.tasks import common, grounding
from mergelab.bench.train import TrainConfig, encode, greedy_answers, train

PROBES = ("colour", "shape", "digit", "digit-fixed", "digit-large", "letter-large", "vqa-small", "vqa-large",
          "ground-1", "ground-3")
TRAINABLE = {"all": None, "lm": r"model\.language_model\..*|lm_head\..*"}


def make_items(probe: str, n: int, rng: random.Random) -> list[SimpleNamespace]:
    """``n`` items of ``probe`` (objects with ``image``, ``question``, ``answer``)."""
    items = []
    colours = list(common.GENERIC_COLOURS)
    for i in range(n):
        img = Image.new("RGB", (112, 112), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        if probe == "colour":
            c = rng.choice(colours)
            x, y = rng.randrange(0, 88), rng.randrange(0, 88)
            draw.rectangle((x, y, x + 24, y + 24), fill=common.GENERIC_COLOURS[c])
            q, a = "what color is the square?", c
        elif probe == "shape":
            shape, size = rng.choice(common.SHAPES), rng.choice((22, 24))
            cx, cy = rng.randrange(4), rng.randrange(4)
            x, y = cx * 28 + (28 - size) // 2, cy * 28 + (28 - size) // 2
            common.draw_shape(draw, shape, (x, y, x + size, y + size), (0, 0, 0))
            q, a = "what shape is it?", shape
        elif probe in ("vqa-small", "vqa-large"):
            shape, c = rng.choice(common.SHAPES), rng.choice(colours)
            size = rng.choice((24, 32, 40) if probe == "vqa-small" else (40, 48, 56))
            x, y = rng.randrange(0, 112 - size), rng.randrange(0, 112 - size)
            common.draw_shape(draw, shape, (x, y, x + size - 1, y + size - 1), common.COLOURS[c])
            kind = rng.choice(("colour", "shape", "exists"))
            if kind == "colour":
                q, a = f"what color is the {shape}?", c
            elif kind == "shape":
                q, a = f"what shape is the {c} object?", shape
            elif rng.random() < 0.5:
                q, a = f"is there a {c} {shape}?", "yes"
            else:
                other = rng.choice([z for z in common.SHAPES if z != shape])
                q, a = f"is there a {c} {other}?", "no"
        elif probe in ("ground-1", "ground-3"):
            k = 1 if probe == "ground-1" else rng.choice((2, 3, 4))
            pairs: list[tuple[str, str]] = []
            while len(pairs) < k:
                p = (rng.choice(common.SHAPES), rng.choice(colours))
                if p not in pairs:
                    pairs.append(p)
            cells = rng.sample(range(16), k)
            objs = [common.place_object(rng, sh, co, (cl % 4, cl // 4), rng.choice((22, 24)))
                    for (sh, co), cl in zip(pairs, cells, strict=True)]
            img = common.draw_objects(objs, "gradient")
            q = grounding.PROMPT + f"the {objs[0]['colour']} {objs[0]['shape']}"
            # the cell box without the special box tokens (the greedy decode skips special tokens)
            a = grounding.format_box(grounding.cell_box(objs[0]["cell"], 0))
            a = a.removeprefix("<|box_start|>").removesuffix("<|box_end|>")
        elif probe in ("digit-large", "letter-large"):
            digit, dot = rng.choice("0123456789" if probe == "digit-large" else "ACEHKLPRTX"), 8
            x0, y0 = (112 - 5 * dot) // 2 + rng.randint(-4, 4), (112 - 7 * dot) // 2 + rng.randint(-4, 4)
            common.draw_glyph(draw, digit, x0, y0, dot=dot)
            q, a = "what is written in the image?", digit
        else:
            digit = rng.choice("0123456789")
            cx, cy = (0, 0) if probe == "digit-fixed" else (rng.randrange(4), rng.randrange(4))
            x = cx * 28 + (28 - common.GLYPH_W) // 2 + rng.randint(-2, 2)
            y = cy * 28 + (28 - common.GLYPH_H) // 2 + rng.randint(-2, 2)
            common.draw_glyph(draw, digit, x, y)
            q, a = "what is written in the image?", digit
        items.append(SimpleNamespace(image=img, question=q, answer=a, id=f"{probe}-{i}"))
    return items


def run_probe(probe: str, *, steps: int, lr: float, trainable: str, processor, seed: int = 0) -> dict:
    """Train a fresh tiny model on ``probe`` and return its held-out accuracy, final loss and seconds."""
    rng = random.Random(seed)
    train_items, test_items = make_items(probe, 3000, rng), make_items(probe, 200, rng)
    model = modeling.build_model(processor.tokenizer, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=min(10, steps), seed=seed,
                      trainable=TRAINABLE[trainable])
    t0 = time.perf_counter()
    res = train(model, processor, encode(train_items, processor), cfg, device="cpu")
    preds = greedy_answers(res.model, processor, test_items)
    acc = 100.0 * sum(p == it.answer for p, it in zip(preds, test_items, strict=True)) / len(test_items)
    return {"probe": probe, "train": trainable, "steps": steps, "lr": lr, "acc": acc,
            "loss": sum(res.losses[-10:]) / len(res.losses[-10:]), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", default=",".join(PROBES), help=f"comma-separated: {', '.join(PROBES)}")
    ap.add_argument("--train", default="all,lm", help="comma-separated: all, lm")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = [t for p in PROBES for it in make_items(p, 40, random.Random(1)) for t in (it.question, it.answer)]
    corpus += list(common.GENERIC_COLOURS) + list(common.SHAPES) + list("0123456789ACEHKLPRTX") + ["yes", "no"]
    processor = modeling.build_processor(modeling.build_tokenizer(modeling.corpus_lines(
        [SimpleNamespace(question=q, answer="") for q in corpus]), vocab_size=args.vocab_size))
    print("| probe | trained | steps | lr | held-out acc % | final loss | seconds |\n|---|---|---|---|---|---|---|")
    for probe in args.probe.split(","):
        for trainable in args.train.split(","):
            r = run_probe(probe, steps=args.steps, lr=args.lr, trainable=trainable, processor=processor)
            print(f"| {r['probe']} | {r['train']} | {r['steps']} | {r['lr']:g} | {r['acc']:.1f} | {r['loss']:.3f} "
                  f"| {r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
