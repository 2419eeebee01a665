"""Golden cases for mergelab.evaluators.metrics, written from each reference implementation's behaviour."""

from __future__ import annotations

import math

import pytest

from mergelab.evaluators import metrics as M

# --- VQA normalisation and soft accuracy (official VQA eval / VLMEvalKit process_answer) --------------------------


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("1,000", "1000"),  # digit-comma-digit: every punctuation mark is deleted
        ("3.5", "3.5"),  # a period before a digit survives
        ("yes.", "yes"),
        ("A dog", "dog"),  # articles dropped
        ("the cat, a hat", "cat hat"),  # "," glued to a word but followed by a space -> removed
        ("red/blue", "red blue"),  # glued punctuation without surrounding spaces -> a space
        ("dont", "don't"),  # contractions canonicalised
        ("Im", "im"),  # the official table's capitalised keys never match lower-cased text
        ("  hello\n\tworld ", "hello world"),
        ("", ""),
    ],
)
def test_vqa_normalize_golden(raw: str, norm: str) -> None:
    assert M.vqa_normalize(text=raw) == norm


def test_vqa_soft_accuracy_counts_other_annotators() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    # 3 matches: the 3 matching GTs see 2 others (2/3), the 7 others see 3 (1) -> (3*2/3 + 7)/10 = 0.9
    assert M.vqa_soft_accuracy(prediction="two", answers=ten) == pytest.approx(0.9)
    assert M.vqa_soft_accuracy(prediction="3", answers=ten) == pytest.approx(1.0)
    one = ["cat"] + ["dog"] * 9  # 1 match: 9 GTs see 1 other (1/3), the matching one sees 0
    assert M.vqa_soft_accuracy(prediction="Cat.", answers=one) == pytest.approx(0.3)
    two = ["cat"] * 2 + ["dog"] * 8
    assert M.vqa_soft_accuracy(prediction="cat", answers=two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert M.vqa_soft_accuracy(prediction="1000", answers=["1,000"] * 10) == 1.0
    assert M.vqa_soft_accuracy(prediction="bird", answers=ten) == 0.0


def test_vqa_soft_accuracy_edge_cases() -> None:
    assert M.vqa_soft_accuracy(prediction="x", answers=[]) == 0.0
    assert (
        M.vqa_soft_accuracy(prediction="cat", answers=["cat"]) == 0.0
    )  # no "other" answers, as the reference
    assert M.vqa_soft_accuracy(prediction="", answers=[""] * 10) == 1.0  # empty answers are answers
    assert M.vqa_soft_accuracy(prediction="unanswerable", answers=["Unanswerable"] * 10) == 1.0


# --- exact match with the paper's modified normaliser -------------------------------------------------------------


def test_exact_match_modified_normaliser() -> None:
    assert M.normalize_modified(text="  The Cat.  ") == "the cat"
    assert M.normalize_modified(text="Harry Potter: Book 1!") == "harry potter book 1"
    assert M.exact_match(prediction="Yes.", answers=["yes"]) == 1.0
    assert M.exact_match(prediction="1,000", answers=["1000"]) == 1.0
    assert M.exact_match(prediction="two", answers=["2"]) == 0.0  # no number-word mapping here
    assert M.exact_match(prediction="left", answers=["right", "Left"]) == 1.0  # max over ground truths
    assert M.exact_match(prediction="a dog", answers=["dog"]) == 0.0  # articles are kept
    assert M.exact_match(prediction="", answers=[]) == 0.0
    assert M.exact_match(prediction="", answers=[""]) == 1.0


# --- ChartQA relaxed accuracy (pix2struct relaxed_correctness) -----------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("45%", "0.45", 1.0),  # percentages are divided by 100
        ("45", "0.45", 0.0),
        ("45%", "45", 0.0),
        ("104", "100", 1.0),  # within 5 %
        ("105", "100", 1.0),  # exactly 5 % is accepted
        ("105.1", "100", 0.0),
        ("-98", "-100", 1.0),
        ("1,000", "1000", 0.0),  # "1,000" does not parse: exact string match fails
        ("1000", "1,000", 0.0),
        ("0", "0", 1.0),  # a zero target falls back to exact match
        ("0.0", "0", 0.0),
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),  # case-insensitive text match
        ("yes ", "yes", 0.0),  # the function itself does not strip (VLMEvalKit strips the prediction first)
        ("", "", 1.0),
        ("", "5", 0.0),
        ("1e2", "100", 1.0),  # anything Python's float() parses
    ],
)
def test_relaxed_accuracy_golden(prediction: str, target: str, expected: float) -> None:
    assert M.relaxed_accuracy(prediction=prediction, target=target) == expected


def test_relaxed_accuracy_max_strips_and_takes_best() -> None:
    assert M.relaxed_accuracy_max(prediction=" 101 \n", answers=["abc", "100"]) == 1.0
    assert M.relaxed_accuracy_max(prediction="7", answers=[]) == 0.0
    assert M.relaxed_accuracy(prediction="110", target="100", tol=0.1) == 1.0


# --- ANLS (lmms-eval anls; VLMEvalKit anls_compute + hit_calculate) ------------------------------------------------


def test_anls_golden() -> None:
    assert M.anls(prediction="Hello  World", answers=["hello world"]) == 1.0  # case and spaces normalised
    assert M.anls(prediction="hello worl", answers=["hello world"]) == pytest.approx(1 - 1 / 11)
    assert M.anls(prediction="abcd", answers=["abef"]) == 0.5  # exactly the threshold is kept
    assert M.anls(prediction="abcd", answers=["aefg"]) == 0.0  # 0.25 < 0.5 -> 0
    assert M.anls(prediction="abcd", answers=["zzzz", "abce"]) == pytest.approx(0.75)  # best ground truth
    assert M.anls(prediction="", answers=[""]) == 1.0
    assert M.anls(prediction="", answers=["abc"]) == 0.0
    assert M.anls(prediction="x", answers=[]) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        # the distance is taken on the normalised strings, the length on the strings as given (lmms-eval)
        ("helo world  ", "hello world", 1 - 1 / 12),  # trailing spaces lengthen the divisor: 0.9167, not 0.9091
        ("hello world", "  helo world", 1 - 1 / 12),  # on the ground truth's side too
        ("helo  world", "hello world", 1 - 1 / 11),  # an inner double space: normalised away, counted in length
        ("HELO WORLD", "hello world", 1 - 1 / 11),  # case: no distance, same length
        ("Helo World\n", "hello world", 1 - 1 / 11),  # a newline is whitespace: 11 characters as given
        ("  hello world  ", "hello world", 1.0),  # no distance left after normalising
        ("   ", "", 1.0),  # both empty once stripped: distance 0 over 3
        ("abcd  ", "abef", 1 - 2 / 6),  # 0.667: the padding lifts a 0.5 case, still above the cut-off
        ("abcde    ", "aefgh", 1 - 4 / 9),  # 0.556 > 0.5 (0.2 without padding -> 0)
        ("abcde", "aefgh", 0.0),  # 1 - 4/5 = 0.2 < 0.5 -> 0
    ],
)
def test_anls_divides_by_the_given_lengths(prediction: str, answer: str, expected: float) -> None:
    assert M.anls(prediction=prediction, answers=[answer]) == pytest.approx(expected)


# --- grounding (lmms-eval utils_rec / InternVL evaluate_grounding) -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("<|box_start|>(100,200),(300,400)<|box_end|>", (0.1, 0.2, 0.3, 0.4)),  # Qwen2-VL, 0-1000 grid
        ("(100, 200), (300, 400)", (0.1, 0.2, 0.3, 0.4)),  # special tokens skipped on decoding
        ("[[100, 200, 300, 400]]", (0.1, 0.2, 0.3, 0.4)),  # InternVL
        ("The box is [0.1, 0.2, 0.3, 0.4].", (0.1, 0.2, 0.3, 0.4)),  # plain list, already normalised
        ("100, 200, 300, 400", (0.1, 0.2, 0.3, 0.4)),
        ("[.1, .2, .3, .4]", (0.1, 0.2, 0.3, 0.4)),
        ("[[300, 400, 100, 200]]", (0.1, 0.2, 0.3, 0.4)),  # swapped corners are put in order
        ("[[-50, 200, 1200, 400]]", (0.0, 0.2, 1.0, 0.4)),  # out of range: clipped to the image
        ("[[1, 1, 500, 500]]", (0.001, 0.001, 0.5, 0.5)),  # one coordinate above 1 puts the box on the grid
    ],
)
def test_parse_box_formats(text: str, box: tuple[float, ...]) -> None:
    got = M.parse_box(text=text, scale=1000.0)
    assert got is not None
    assert got == pytest.approx(box)


@pytest.mark.parametrize("text", ["", "no box here", "[[1, 2, 3]]", "(1,2)", "[[a, b, c, d]]", "None"])
def test_parse_box_malformed_is_none(text: str) -> None:
    assert M.parse_box(text=text) is None


def test_grounding_scores() -> None:
    tgt = (0.1, 0.2, 0.3, 0.4)
    hit = M.grounding_scores(prediction="<|box_start|>(100,200),(300,400)<|box_end|>", target_box=tgt)
    assert hit == {"acc_iou50": 1.0, "iou": pytest.approx(1.0)}
    # half-overlap in x: inter = 0.1*0.2, union = 0.2*0.2 + 0.2*0.2 - 0.02 -> IoU 1/3 -> miss
    half = M.grounding_scores(prediction="[[200, 200, 400, 400]]", target_box=tgt)
    assert half["acc_iou50"] == 0.0 and half["iou"] == pytest.approx(1 / 3)
    # IoU exactly 0.5 counts as a hit (>=)
    edge = M.grounding_scores(prediction="[[0.0, 0.0, 0.5, 1.0]]", target_box=(0.0, 0.0, 1.0, 1.0))
    assert edge["acc_iou50"] == 1.0 and edge["iou"] == pytest.approx(0.5)
    assert M.grounding_scores(prediction="garbage", target_box=tgt) == {"acc_iou50": 0.0, "iou": 0.0}
    assert M.grounding_scores(prediction="", target_box=tgt)["iou"] == 0.0
    # a degenerate (zero-area) prediction never divides by zero
    assert M.grounding_scores(prediction="[[100, 100, 100, 100]]", target_box=tgt)["iou"] == 0.0
    assert M.box_iou(box_a=(0, 0, 0, 0), box_b=(0, 0, 0, 0)) == 0.0


# --- MathVista / MATH-Vision rule-based extraction -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "index"),
    [
        ("B", 1),
        ("(C)", 2),
        ("C.", 2),
        ("The answer is (B).", 1),
        ("Answer: D", 3),
        ("Option A is wrong, so the correct option is C", 2),
        ("The answer is C. Final answer: D", 3),
        ("A triangle has three sides, so the answer is C", 2),  # "A" is the article
        ("60°", 1),  # the option's text itself
        ("I think it is 60° because ...", 1),
        ("", None),
        ("no idea", None),
        ("A or B", None),  # ambiguous
    ],
)
def test_extract_choice(prediction: str, index: int | None) -> None:
    assert M.extract_choice(prediction=prediction, choices=["30°", "60°", "90°", "120°"]) == index


@pytest.mark.parametrize(
    ("prediction", "number"),
    [
        ("42", 42.0),
        ("The answer is 1,000 apples", 1000.0),
        ("x = 3, so the answer is 12.5.", 12.5),
        ("3/4", 0.75),
        ("-7", -7.0),
        ("\\boxed{9}", 9.0),
        ("first 3 then 5", 5.0),  # the last number
        ("no number", None),
        ("", None),
    ],
)
def test_extract_number(prediction: str, number: float | None) -> None:
    got = M.extract_number(prediction=prediction)
    assert got == (pytest.approx(number) if number is not None else None)


def test_mathvista_score() -> None:
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["30°", "60°", "90°"]}
    assert M.mathvista_score(prediction="(B)", answer="60°", **mc) == 1.0
    assert M.mathvista_score(prediction="(A)", answer="60°", **mc) == 0.0
    assert (
        M.mathvista_score(prediction="it is 5", answer="5", question_type="free_form", answer_type="integer")
        == 1.0
    )
    assert (
        M.mathvista_score(prediction="5.4", answer="5", question_type="free_form", answer_type="integer")
        == 1.0
    )
    kw = {"question_type": "free_form", "answer_type": "float", "precision": 1}
    assert M.mathvista_score(prediction="2.54", answer="2.5", **kw) == 1.0
    assert M.mathvista_score(prediction="2.46", answer="2.6", **kw) == 0.0
    assert M.mathvista_score(prediction="", answer="2.5", **kw) == 0.0


def test_mathvision_score() -> None:
    opts = ["1", "2", "3", "4", "5"]
    assert M.mathvision_score(prediction="C", answer="C", options=opts) == 1.0
    assert M.mathvision_score(prediction="(D)", answer="C", options=opts) == 0.0
    assert M.mathvision_score(prediction="The answer is 2.50", answer="2.5") == 1.0
    assert M.mathvision_score(prediction="pi", answer="\\pi") == 1.0  # textual fall-back after normalisation
    assert M.mathvision_score(prediction="", answer="7") == 0.0


def test_geometry_subset_aggregation() -> None:
    rows = ("geometry reasoning", "algebraic reasoning", "geometry problem solving")
    scores = [1, 0, 1, 1, 0]
    cats = [
        ["geometry reasoning", "geometry problem solving"],
        ["geometry reasoning"],
        ["algebraic reasoning"],
        ["algebraic reasoning", "Geometry Problem Solving"],
        ["arithmetic reasoning"],  # in no row: ignored
    ]
    out = M.subset_mean_accuracy(scores=scores, categories=cats, rows=rows)
    assert out["geometry reasoning"] == pytest.approx(0.5)
    assert out["algebraic reasoning"] == pytest.approx(1.0)
    assert out["geometry problem solving"] == pytest.approx(1.0)
    assert out["subset"] == pytest.approx((0.5 + 1 + 1) / 3)  # unweighted mean of rows, not of items
    empty = M.subset_mean_accuracy(scores=[1], categories=[["geometry reasoning"]], rows=rows)
    assert empty["subset"] == 1.0 and math.isnan(empty["algebraic reasoning"])
    # MATH-Vision: 19 items per subject -> values are multiples of 1/76 (spec: 40.79 = 31/76)
    sub = list(M.MATHVISION_GEOMETRY_ROWS)
    cats2 = [[s] for s in sub for _ in range(19)]
    right = {sub[0]: 8, sub[1]: 8, sub[2]: 8, sub[3]: 7}
    scores2 = [1.0 if i < right[s] else 0.0 for s in sub for i in range(19)]
    got = M.subset_mean_accuracy(scores=scores2, categories=cats2, rows=sub)["subset"]
    assert 100 * got == pytest.approx(100 * 31 / 76) and round(100 * got, 2) == 40.79


def test_metrics_take_keyword_arguments_only() -> None:
    with pytest.raises(TypeError):
        M.relaxed_accuracy("1", "1")  # type: ignore[misc]
