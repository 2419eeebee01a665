"""Per-sample metrics of the paper's benchmarks (its Tables 2 and 3), as pure functions over generated text.

Every function takes keyword-only arguments (public copies of pix2struct's ``relaxed_correctness`` disagree on
argument order), returns a float in [0, 1] (or a parsed value) and never raises on malformed model output. Each
one cites the reference implementation whose documented behaviour it reproduces; the golden tests in
``tests/test_metrics.py`` pin that behaviour, the awkward cases included. The module is over 500 lines on
purpose: one flat file of small pure functions, each next to the reference quirks it reproduces, whose shared
normalisers (VQA, modified exact match, number extraction) serve several benchmarks.

References:
    * VQA normalisation and soft accuracy: the official VQA evaluation (GT-Vision-Lab/VQA, ``vqaEval.py``) as
      applied by VLMEvalKit ``vlmeval/dataset/utils/vqa_eval.py`` (``process_answer``, ``process_line``) and
      lmms-eval ``EvalAIAnswerProcessor``.
    * Exact match with the paper's modified normaliser: the OptMerge repository's modified ``accuracy`` method
      in VLMEvalKit ``vqa_eval.py``.
    * Relaxed accuracy: pix2struct ``metrics.py::relaxed_correctness`` (also used by VLMEvalKit and lmms-eval).
    * ANLS: lmms-eval ``api/metrics.py::anls`` and VLMEvalKit ``anls_compute`` + ``hit_calculate`` (DocVQA /
      InfographicVQA); both divide by the lengths of the strings as given.
    * Grounding: lmms-eval ``tasks/refcoco/utils_rec.py`` (IoU, ACC@0.5) and InternVL
      ``eval/refcoco/evaluate_grounding.py`` (Precision@1 at IoU >= 0.5).
    * MathVista / MATH-Vision: rule-based answer extraction in the spirit of MathVista's ``quick_extract`` and
      VLMEvalKit's ``can_infer``; geometry-subset aggregation of the OptMerge repository's ``results.py``.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence

__all__ = [
    "vqa_normalize",
    "vqa_soft_accuracy",
    "normalize_modified",
    "exact_match",
    "relaxed_accuracy",
    "relaxed_accuracy_max",
    "anls",
    "parse_box",
    "box_iou",
    "grounding_scores",
    "extract_choice",
    "extract_number",
    "mathvista_score",
    "mathvision_score",
    "subset_mean_accuracy",
    "mean",
    "MATHVISTA_GEOMETRY_ROWS",
    "OPTION_LETTERS",
    "MATHVISION_GEOMETRY_ROWS",
]

# ---------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (official VQA evaluation, as VLMEvalKit's process_answer applies it)
# ---------------------------------------------------------------------------------------------------------------

_VQA_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is written ``(?!<=\d)(\.)(?!\d)``: the first group is a (no-op) negative *lookahead*, so in
# effect every period not followed by a digit is removed. Reproduced as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count`` (= 32).
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """The official VQA contraction table (apostrophe-less spelling -> canonical spelling)."""
    pairs = (
        "aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|"
        "couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|"
        "hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|"
        "howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|"
        "itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|"
        "mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|"
        "neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|"
        "'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|"
        "shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|"
        "somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|"
        "someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|"
        "someones someone's|somethingd something'd|somethingd've something'd've|something'dve something'd've|"
        "somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've|"
        "therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|"
        "theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|"
        "werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd|"
        "wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|"
        "whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|"
        "wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|"
        "yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|"
        "you'dve you'd've|youll you'll|youre you're|youve you've"
    )
    return dict(p.split(" ") for p in pairs.split("|"))


_CONTRACTIONS = _contractions()


def _vqa_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _VQA_PUNCT:
        # Decided on the *input* text, as the official code does.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _vqa_digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(*, text: str) -> str:
    """Normalise an answer as the official VQA evaluation does (VLMEvalKit ``process_answer``).

    Newlines and tabs become spaces; punctuation is removed (or replaced by a space when it is glued between
    words and the text has no digit-comma-digit group, so ``"1,000"`` becomes ``"1000"``); periods not followed
    by a digit are dropped (``"3.5"`` survives); the text is lower-cased; number words zero to ten become digits
    (``"none"`` becomes ``"0"``); articles are dropped; contractions are canonicalised.

    Args:
        text: An answer or a prediction.

    Returns:
        The normalised string.
    """
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_soft_accuracy(*, prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy, as VLMEvalKit ``process_line(method="vqa_score")`` + ``hit_calculate`` compute it.

    Both the prediction and every ground truth go through :func:`vqa_normalize`. For each ground truth ``i``
    the score is ``min(1, #{j != i : gt_j == pred} / 3)``; the result is the mean over ground truths. With the
    usual 10 answers, a prediction given by 3 or more annotators scores 1 and one given by 1 annotator 0.3.
    A single ground truth therefore always scores 0 (there are no "other" answers), exactly as the reference.

    Args:
        prediction: The model's answer.
        answers: The annotators' answers (10 for VQAv2, VizWiz and TextVQA).

    Returns:
        The soft accuracy in [0, 1]; 0 when ``answers`` is empty.
    """
    gts = [vqa_normalize(text=a) for a in answers]
    if not gts:
        return 0.0
    pred = vqa_normalize(text=prediction)
    n_match = sum(g == pred for g in gts)
    per_gt = [min(1.0, (n_match - (g == pred)) / 3.0) for g in gts]
    return float(sum(per_gt) / len(per_gt))


# ---------------------------------------------------------------------------------------------------------------
# Exact match with the paper's modified normaliser (GQA, OCR-VQA)
# ---------------------------------------------------------------------------------------------------------------

_ALL_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_modified(*, text: str) -> str:
    """The OptMerge repository's modified normaliser: lower-case, all ASCII punctuation removed, spaces collapsed.

    Args:
        text: An answer or a prediction.

    Returns:
        The normalised string (``"The Cat."`` -> ``"the cat"``; ``"1,000"`` -> ``"1000"``).
    """
    return " ".join(_ALL_PUNCT.sub("", str(text).lower()).split())


def exact_match(*, prediction: str, answers: Sequence[str]) -> float:
    """Exact match after :func:`normalize_modified`, max over ground truths (the paper's GQA and OCR-VQA).

    Args:
        prediction: The model's answer.
        answers: One or more ground truths.

    Returns:
        1.0 if the normalised prediction equals any normalised ground truth, else 0.0 (also for no answers).
    """
    pred = normalize_modified(text=prediction)
    return float(any(normalize_modified(text=a) == pred for a in answers))


# ---------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy (pix2struct relaxed_correctness)
# ---------------------------------------------------------------------------------------------------------------


def _pix2struct_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(*, prediction: str, target: str, tol: float = 0.05) -> float:
    """ChartQA relaxed correctness, exactly as pix2struct ``metrics.py::relaxed_correctness``.

    Both strings are parsed with Python's ``float`` (a trailing ``%`` divides by 100, so ``"45%"`` reads 0.45 and
    matches ``"0.45"``). When the prediction parses and the target parses to a non-zero number, the answer is
    correct iff ``|pred - target| / |target| <= tol``. Otherwise (text, ``"1,000"``, a zero target) it is a
    case-insensitive exact string match. As in VLMEvalKit, strip the prediction before calling.

    Args:
        prediction: The model's answer.
        target: One ground truth.
        tol: The maximum relative change (0.05 in the reference).

    Returns:
        1.0 or 0.0.
    """
    prediction, target = str(prediction), str(target)
    p, t = _pix2struct_float(prediction), _pix2struct_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tol)
    return float(prediction.lower() == target.lower())


def relaxed_accuracy_max(*, prediction: str, answers: Sequence[str], tol: float = 0.05) -> float:
    """:func:`relaxed_accuracy` of the stripped prediction, max over ground truths (VLMEvalKit ChartQA)."""
    pred = str(prediction).strip()
    return max((relaxed_accuracy(prediction=pred, target=a, tol=tol) for a in answers), default=0.0)


# ---------------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA)
# ---------------------------------------------------------------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        cur = [j]
        for i, ca in enumerate(a, 1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
        prev = cur
    return prev[-1]


def anls(*, prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one sample, as lmms-eval ``anls`` (and VLMEvalKit).

    The edit distance is taken between the stripped, lower-cased and whitespace-collapsed strings, but it is
    divided by the longer of the two strings *as given* (their upper-cased lengths, before any stripping), as
    both references do: ``'helo world  '`` against ``'hello world'`` is ``1 - 1/12``, not ``1 - 1/11``. The
    distance is 0 when both given strings are empty; the best ground truth is kept; a similarity below
    ``threshold`` becomes 0 (exactly ``threshold`` is kept).

    Args:
        prediction: The model's answer.
        answers: The ground truths.
        threshold: The ANLS cut-off (0.5 in the reference).

    Returns:
        The similarity in [0, 1]; 0 when ``answers`` is empty.
    """
    if not answers:
        return 0.0
    raw_pred = str(prediction)
    pred = " ".join(raw_pred.strip().lower().split())
    best = math.inf
    for a in answers:
        raw_gt = str(a)
        gt = " ".join(raw_gt.strip().lower().split())
        length = max(len(raw_gt.upper()), len(raw_pred.upper()))
        best = min(best, 0.0 if length == 0 else _levenshtein(gt, pred) / length)
    sim = 1.0 - best
    return 0.0 if sim < threshold else float(sim)


# ---------------------------------------------------------------------------------------------------------------
# Grounding (RefCOCO / RefCOCO+ / RefCOCOg)
# ---------------------------------------------------------------------------------------------------------------

_NUM = r"(-?(?:\d+(?:\.\d+)?|\.\d+))"
_SEP = r"\s*,\s*"
_BOX_PATTERNS = (
    # Qwen2-VL: <|box_start|>(x1,y1),(x2,y2)<|box_end|>  (the special tokens may have been skipped on decoding)
    re.compile(r"\(\s*" + _NUM + _SEP + _NUM + r"\s*\)\s*,?\s*\(\s*" + _NUM + _SEP + _NUM + r"\s*\)"),
    # InternVL [[x1, y1, x2, y2]] and plain lists [x1, y1, x2, y2]
    re.compile(r"\[\s*" + _NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM + r"\s*\]"),
    # bare "x1, y1, x2, y2"
    re.compile(_NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM),
)


def parse_box(*, text: str, scale: float = 1000.0) -> tuple[float, float, float, float] | None:
    """Parse a predicted ``xyxy`` box into normalised [0, 1] coordinates.

    Formats (first match wins, searched in this order): Qwen2-VL ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
    (with or without the special tokens), InternVL ``[[x1, y1, x2, y2]]``, a plain list ``[x1, y1, x2, y2]``
    and a bare ``x1, y1, x2, y2``. As the paper's tools do (lmms-eval Qwen wrapper, InternVL
    ``evaluate_grounding.py``), a box with any coordinate above 1 is on the ``0..scale`` grid and is divided by
    ``scale``; a box with all coordinates in [0, 1] is taken as already normalised. Swapped corners are put in
    order and coordinates are clipped to [0, 1].

    Args:
        text: The model's answer.
        scale: The grid size of non-normalised boxes (1000 for Qwen2-VL and InternVL).

    Returns:
        ``(x1, y1, x2, y2)`` in [0, 1], or None when no box can be parsed.
    """
    text = str(text)
    for pat in _BOX_PATTERNS:
        m = pat.search(text)
        if m is None:
            continue
        try:
            c = [float(g) for g in m.groups()]
        except ValueError:  # pragma: no cover - the regex only admits numbers
            return None
        return _box_from_coords(c, scale)
    return None


def _box_from_coords(c: Sequence[float], scale: float) -> tuple[float, float, float, float] | None:
    c = [float(v) for v in c]
    if len(c) != 4 or not all(math.isfinite(v) for v in c):
        return None
    if max(c) > 1.0:
        c = [v / scale for v in c]
    c = [min(1.0, max(0.0, v)) for v in c]
    x1, x2 = sorted((c[0], c[2]))
    y1, y2 = sorted((c[1], c[3]))
    return (x1, y1, x2, y2)


def box_iou(*, box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two ``xyxy`` boxes (lmms-eval ``compute_iou``); 0 for empty unions.

    Args:
        box_a: ``(x1, y1, x2, y2)``.
        box_b: ``(x1, y1, x2, y2)``.

    Returns:
        The IoU in [0, 1].
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_scores(
    *, prediction: str, target_box: Sequence[float], scale: float = 1000.0, threshold: float = 0.5
) -> dict[str, float]:
    """Grounding scores of one sample: ``acc_iou50`` (IoU >= threshold) and ``iou``.

    References: lmms-eval ``refcoco/utils_rec.py`` (ACC@0.5 and IoU), InternVL ``evaluate_grounding.py``
    (Precision@1 at IoU >= 0.5). A malformed answer scores 0 on both and never raises.

    Args:
        prediction: The model's answer, parsed with :func:`parse_box`.
        target_box: The reference ``xyxy`` box, normalised to [0, 1] (or on the ``0..scale`` grid).
        scale: The grid size of non-normalised boxes, for both prediction and target.
        threshold: The IoU threshold of a hit (0.5 in the paper).

    Returns:
        ``{"acc_iou50": 0. or 1., "iou": float}``.
    """
    pred = parse_box(text=prediction, scale=scale)
    try:
        tgt = _box_from_coords(list(target_box), scale) if target_box is not None else None
    except (TypeError, ValueError):
        tgt = None
    if pred is None or tgt is None:
        return {"acc_iou50": 0.0, "iou": 0.0}
    iou = box_iou(box_a=pred, box_b=tgt)
    return {"acc_iou50": float(iou >= threshold), "iou": iou}


# ---------------------------------------------------------------------------------------------------------------
# MathVista / MATH-Vision: rule-based answer extraction and the geometry-subset aggregation
# ---------------------------------------------------------------------------------------------------------------

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Option letters of multiple-choice questions, in order."""
_WORD_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
# "A" followed by a lower-case word is the article, unless the word joins options ("A or B", "A is ...").
_ARTICLE_A = re.compile(r"(?<![A-Za-z])A (?!(?:or|and|is|was|seems|looks)\b)[a-z]")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(
    r"(?i:answer|correct option|correct choice)\s*(?i:is|should be|would be)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])"
)


def extract_choice(*, prediction: str, choices: Sequence[str]) -> int | None:
    """Rule-based multiple-choice extraction (MathVista ``quick_extract`` / VLMEvalKit ``can_infer`` style).

    Tried in order: the whole answer equals a choice's text; an explicit "answer is (X)" / "Answer: X"; a
    lone option letter ``X``, ``(X)``, ``X.``, ``X)`` at the start; exactly one distinct standalone option letter
    in the text; exactly one choice text contained in the answer. An LLM judge is not used.

    Args:
        prediction: The model's answer.
        choices: The option texts, in letter order (A, B, ...).

    Returns:
        The 0-based index of the chosen option, or None when it cannot be determined.
    """
    pred = str(prediction).strip()
    n = len(choices)
    if not pred or n == 0:
        return None
    letters = OPTION_LETTERS[:n]
    norm = normalize_modified
    np_ = norm(text=pred)
    for i, c in enumerate(choices):
        if np_ == norm(text=c) and np_:
            return i
    boxed = _BOXED.search(pred)
    if boxed:
        inner = boxed.group(1).strip().strip("()")
        if len(inner) == 1 and inner.upper() in letters:
            return letters.index(inner.upper())
    stated = [x for x in _ANSWER_IS.findall(pred) if x in letters]
    if stated:
        return letters.index(stated[-1])  # the last explicit statement wins
    found = {x for x in re.findall(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])", pred) if x in letters}
    if len(found) > 1 and _ARTICLE_A.search(pred):
        found.discard("A")  # a capital "A" before a lower-case word is the article, as VLMEvalKit notes
    m = re.match(r"^\(?([A-Z])(?:([).:,])|\s|$)", pred)
    if m and m.group(1) in letters and (m.group(2) or found == {m.group(1)} or len(pred) == 1):
        return letters.index(m.group(1))  # "B", "(B)", "B.", "B) ..." at the start
    if len(found) == 1:
        return letters.index(found.pop())
    contained = [i for i, c in enumerate(choices) if norm(text=c) and f" {norm(text=c)} " in f" {np_} "]
    if len(contained) == 1:
        return contained[0]
    return None


def _to_number(token: str) -> float | None:
    t = token.replace(",", "").replace(" ", "")
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(num) / float(den) if float(den) != 0 else None
        return float(t)
    except ValueError:
        return None


def extract_number(*, prediction: str) -> float | None:
    """Rule-based numeric extraction: a ``\\boxed{}`` value, else the number after "answer is", else the last one.

    Thousands separators are removed (``"1,000"`` reads 1000), a simple fraction ``"3/4"`` reads 0.75, a trailing
    ``%`` is kept as the number itself (MathVista answers are percentages written without ``%``).

    Args:
        prediction: The model's answer.

    Returns:
        The number, or None when there is none.
    """
    pred = str(prediction)
    boxed = _BOXED.findall(pred)
    for cand in (boxed[-1] if boxed else None,):
        if cand is not None:
            nums = _WORD_NUM.findall(cand)
            if nums:
                return _to_number(nums[-1])
    m = re.search(r"answer\s*(?:is|:)\s*(.*)", pred, re.IGNORECASE | re.DOTALL)
    if m:
        nums = _WORD_NUM.findall(m.group(1))
        if nums:
            return _to_number(nums[0])
    nums = _WORD_NUM.findall(pred)
    return _to_number(nums[-1]) if nums else None


def _numbers_equal(a: float, b: float, *, precision: int | None) -> bool:
    if precision is not None:
        return round(a, precision) == round(b, precision)
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def mathvista_score(
    *,
    prediction: str,
    answer: str,
    question_type: str,
    answer_type: str,
    choices: Sequence[str] | None = None,
    precision: int | None = None,
) -> float:
    """Rule-based MathVista correctness (MathVista ``calculate_score.py`` normalisation, no LLM extractor).

    ``multi_choice``: the extracted option (:func:`extract_choice`) must be the option whose text is the answer.
    ``free_form``: ``integer`` answers compare the extracted number rounded to an int; ``float`` answers compare
    after rounding both to ``precision`` decimals; ``text``/``list`` answers compare with
    :func:`normalize_modified`.

    Args:
        prediction: The model's answer.
        answer: The reference answer (the option text for multiple choice).
        question_type: ``"multi_choice"`` or ``"free_form"``.
        answer_type: ``"text"``, ``"integer"``, ``"float"`` or ``"list"``.
        choices: The options of a multiple-choice question.
        precision: Decimals of a ``float`` answer.

    Returns:
        1.0 or 0.0.
    """
    if question_type == "multi_choice" and choices:
        idx = extract_choice(prediction=prediction, choices=choices)
        return float(
            idx is not None and normalize_modified(text=choices[idx]) == normalize_modified(text=answer)
        )
    if answer_type in ("integer", "float"):
        got, ref = extract_number(prediction=prediction), _to_number(str(answer))
        if got is None or ref is None:
            return 0.0
        if answer_type == "integer":
            return float(int(round(got)) == int(round(ref)))
        return float(_numbers_equal(got, ref, precision=precision if precision is not None else 2))
    return exact_match(prediction=prediction, answers=[answer])


def mathvision_score(*, prediction: str, answer: str, options: Sequence[str] | None = None) -> float:
    """Rule-based MATH-Vision correctness (options A-E, otherwise a numeric or textual answer).

    With options, the answer is a letter; the prediction may give the letter or the option's text. Without,
    numbers compare within a relative tolerance of 1e-4 and text with :func:`normalize_modified`.

    Args:
        prediction: The model's answer.
        answer: The reference answer (a letter when there are options).
        options: The option texts, if any.

    Returns:
        1.0 or 0.0.
    """
    if options:
        idx = extract_choice(prediction=prediction, choices=options)
        return float(idx is not None and OPTION_LETTERS[idx] == str(answer).strip().upper())
    ref = _to_number(str(answer))
    if ref is not None:
        got = extract_number(prediction=prediction)
        return float(got is not None and _numbers_equal(got, ref, precision=None))
    return exact_match(prediction=prediction, answers=[answer])


MATHVISTA_GEOMETRY_ROWS = ("geometry reasoning", "algebraic reasoning", "geometry problem solving")
MATHVISION_GEOMETRY_ROWS = (
    "metric geometry - angle",
    "metric geometry - area",
    "metric geometry - length",
    "solid geometry",
)


def subset_mean_accuracy(
    *, scores: Iterable[float], categories: Iterable[Iterable[str]], rows: Sequence[str]
) -> dict[str, float]:
    """Geometry-subset aggregation (OptMerge ``VLMEvalKit/results.py``).

    Each row's accuracy is the mean score of the samples tagged with that row (a sample may carry several tags:
    MathVista's skills plus its task); the subset score is the unweighted mean of the rows' accuracies. Rows
    without samples are left out of the mean (and reported as NaN).

    Args:
        scores: Per-sample scores in [0, 1].
        categories: Per-sample tags (lower-case strings).
        rows: The rows that make up the subset.

    Returns:
        ``{row: accuracy, ..., "subset": mean}``, accuracies in [0, 1]; ``"subset"`` is NaN when no row has data.
    """
    sums = {r: 0.0 for r in rows}
    counts = {r: 0 for r in rows}
    for s, cats in zip(scores, categories, strict=True):
        tags = {str(c).strip().lower() for c in cats}
        for r in rows:
            if r in tags:
                sums[r] += float(s)
                counts[r] += 1
    out = {r: (sums[r] / counts[r] if counts[r] else math.nan) for r in rows}
    present = [v for v in out.values() if not math.isnan(v)]
    out["subset"] = sum(present) / len(present) if present else math.nan
    return out


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean, NaN for no values."""
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else math.nan
