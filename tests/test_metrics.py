"""VQA accuracy against values worked out by hand from the official rules; CIDEr against pycocoevalcap itself."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.errors import UserError
from stages.metrics import cider, vqa_accuracy

# Leave-one-out with 10 answers of which m match the prediction: the m matching ones see m-1 matches
# among the other 9, the 10-m others see m, each scored min(1, matches / 3), then averaged.
#   m=1: (1*0   + 9*1/3) / 10 = 3/10 = 0.3
#   m=2: (2*1/3 + 8*2/3) / 10 = 6/10 = 0.6
#   m=3: (3*2/3 + 7*1)   / 10 = 9/10 = 0.9
#   m=4: (4*1   + 6*1)   / 10 = 1.0
BY_MATCHES = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}

VQA_CASES = [
    # (prediction, answers, expected): the hand computation follows each case.
    pytest.param("Two", ["2"] * 10, 1.0, id="number-word"),
    # "Two" -> lowercase "two" -> number map "2"; all 10 match -> 1.0
    pytest.param("2", ["two"] * 2 + ["3"] * 8, 0.6, id="number-word-in-answers"),
    # answers are normalised too: "two" -> "2", so m=2 -> 0.6
    pytest.param("None", ["0"] + ["nothing"] * 9, 0.3, id="none-is-zero"),
    # "none" is in the official number map: "0"; m=1 -> 0.3
    pytest.param("A dog", ["the dog", "dog", "an dog"] + ["cat"] * 7, 0.9, id="articles"),
    # "a", "an", "the" are dropped on both sides (answers normalised too, see vqa.py): three answers
    # become "dog"; m=3 -> 0.9
    pytest.param("yes.", ["yes"] * 2 + ["no"] * 8, 0.6, id="trailing-period"),
    # a period not followed by a digit is removed: "yes"; m=2 -> 0.6
    pytest.param("3.5", ["35"] * 10, 0.0, id="decimal-point-kept"),
    # a period followed by a digit stays: "3.5" != "35"; m=0 -> 0.0
    pytest.param("3.5", ["3.5"] * 10, 1.0, id="decimal-point-matches"),
    # "3.5" on both sides; m=10 -> 1.0
    pytest.param("1,000", ["1000"] * 10, 1.0, id="thousands-comma"),
    # the text holds digit,digit so every punctuation mark is deleted (not spaced): "1000"; m=10 -> 1.0
    pytest.param("red, white", ["red white"] * 10, 1.0, id="comma-before-space"),
    # "," touches a space, so it is deleted: "red  white" -> split/join "red white"; m=10 -> 1.0
    pytest.param("black/white", ["black white", "black / white", "black/white"] + ["gray"] * 7, 0.9, id="slash"),
    # "/" touching no space becomes a space: "black white". In the answer "black / white" it touches
    # one, so it is deleted: "black  white" -> split/join "black white" (answers are normalised too,
    # see vqa.py). Three answers match; m=3 -> 0.9
    pytest.param("t-shirt", ["t shirt"] * 2 + ["tshirt"] * 8, 0.6, id="hyphen-becomes-space"),
    # "-" is official punctuation touching no space, so it becomes a space: "t shirt"; the two
    # "t shirt" answers match, the eight "tshirt" do not; m=2 -> 0.6
    pytest.param("yes?", ["yes"] * 10, 1.0, id="question-mark"),
    # "?" becomes a space: "yes " -> split/join "yes"; m=10 -> 1.0
    pytest.param("Dont know", ["don't know"] * 2 + ["no"] * 8, 0.6, id="contraction"),
    # lowercase "dont know"; contractions map "dont" -> "don't"; m=2 -> 0.6
    pytest.param("  yes\n", ["yes"] * 10, 1.0, id="whitespace"),
    # newline/tab become spaces, then strip: "yes"; m=10 -> 1.0
    pytest.param("co-op\n-", ["coop"] * 2 + ["co op"] * 8, 0.6, id="newline-counts-as-space"),
    # the newline becomes a space first, so "-" now touches a space ("co-op -") and every "-" is
    # deleted: "coop" (not "co op"); m=2 -> 0.6
    pytest.param("dog", ["dog"] + ["cat"] * 9, 0.3, id="one-of-ten"),
    # m=1 -> 0.3 (the single matching annotator, left out, leaves 0 matches)
    pytest.param("dog", ["dog"] * 3 + ["cat"] * 7, 0.9, id="three-of-ten"),
    # m=3 -> 0.9
    pytest.param("dog", ["dog"] * 4 + ["cat"] * 6, 1.0, id="four-of-ten"),
    # m=4 -> every left-out answer still leaves >= 3 matches -> 1.0
    pytest.param("cat", ["cat", "dog", "cat"], 4 / 9, id="three-answers"),
    # n=3, m=2: each "cat" left out sees 1 match (1/3), "dog" left out sees 2 (2/3): (1/3+1/3+2/3)/3 = 4/9
]


@pytest.mark.parametrize("prediction, answers, expected", VQA_CASES)
def test_vqa_accuracy_official_rules(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


@given(
    prediction=st.sampled_from(["yes", "no", "2"]),
    answers=st.lists(st.sampled_from(["yes", "no", "2"]), min_size=10, max_size=10),
)
def test_vqa_accuracy_depends_only_on_matching_annotators(prediction, answers):
    # Answers already in normal form: the score is the leave-one-out table above.
    m = answers.count(prediction)
    assert vqa_accuracy(prediction, answers) == pytest.approx(BY_MATCHES.get(m, 1.0))


def test_vqa_accuracy_refuses_a_question_without_answers():
    with pytest.raises(UserError, match="no reference answers"):
        vqa_accuracy("yes", [])


OKVQA_CASES = [
    pytest.param("surfboards", ["surfboard"] * 10, 0.0, 1.0, id="plural"),
    # plain: "surfboards" != "surfboard" -> 0.0; stemmed: plural noun -> "surfboard", m=10 -> 1.0
    pytest.param("skiing", ["ski"] * 10, 0.0, 1.0, id="ing-verb"),
    # stemmed: a word ending in "ing" takes its verb lemma "ski"; m=10 -> 1.0
    pytest.param("tennis", ["tennis"] * 10, 1.0, 1.0, id="not-a-plural"),
    # "tennis" is a singular noun and stays (a suffix rule would give "tenni"); m=10 both ways
    pytest.param("mice", ["mouse"] * 2 + ["rat"] * 8, 0.0, 0.6, id="irregular-plural"),
    # stemmed: "mice" -> "mouse"; m=2 -> 0.6
    pytest.param("Two dogs", ["2 dog"] * 3 + ["3 dog"] * 7, 0.0, 0.9, id="after-normalisation"),
    # normalise first: "2 dogs"; stem each word: "2 dog"; m=3 -> 0.9
    pytest.param("books", ["books"] * 3 + ["pen"] * 7, 0.9, 0.9, id="answers-stemmed-too"),
    # both sides become "book"; m=3 -> 0.9 both ways
]


@pytest.mark.parametrize("prediction, answers, plain, stemmed", OKVQA_CASES)
def test_okvqa_stemming(prediction, answers, plain, stemmed):
    assert vqa_accuracy(prediction, answers) == pytest.approx(plain)
    assert vqa_accuracy(prediction, answers, stem=True) == pytest.approx(stemmed)


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer runs Java")

CAPTION_REFS = {
    "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
          "Man surfing on a big wave."],
    "2": ["Two dogs play with a frisbee in the park.", "A pair of dogs running on the grass.",
          "Dogs chasing a red frisbee."],
    "3": ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
          "A dinner plate with vegetables."],
}
CAPTION_PREDS = {
    "1": "A man is surfing a big wave.",
    "2": "Two dogs running on the grass with a frisbee.",
    "3": "A plate with rice and broccoli.",
}


@needs_java
def test_cider_is_pycocoevalcap_times_100():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTION_REFS.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in CAPTION_PREDS.items()})
    reference, _ = Cider().compute_score(gts, res)

    ours = cider(CAPTION_PREDS, CAPTION_REFS)
    assert reference > 0.05  # a nonzero reference, so the ratio below says something
    assert ours / reference == pytest.approx(100.0, rel=1e-9)


@needs_java
def test_cider_tokenizes_before_scoring():
    # Case and punctuation must not matter once PTB-tokenized; raw strings would score lower.
    shouting = {k: c.upper().rstrip(".") + " !" for k, c in CAPTION_PREDS.items()}
    assert cider(shouting, CAPTION_REFS) == pytest.approx(cider(CAPTION_PREDS, CAPTION_REFS), rel=1e-9)


def test_cider_refuses_mismatched_ids():
    with pytest.raises(UserError, match="same ids"):
        cider({"1": "a dog", "9": "a cat"}, {"1": ["a dog"], "2": ["a cat"]})


def test_metrics_import_is_light():
    # The GPU image runs the stages without pycocoevalcap; torch/transformers must not load for metrics.
    code = (
        "import sys, stages.metrics; "
        "print(sorted(m for m in ('torch', 'transformers', 'pycocoevalcap', 'lemminflect') if m in sys.modules))"
    )
    repo_dpath = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_dpath, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
