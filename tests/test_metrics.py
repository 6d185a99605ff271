"""VQA accuracy against values worked out by hand from the official rules; CIDEr against values worked out
by hand and a small CIDEr-D written here."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
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
    # With normalize_refs (eval.vqa_normalize_refs): the answers are normalised in full, as the prediction.
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
def test_vqa_accuracy_with_normalized_refs(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers, normalize_refs=True) == pytest.approx(expected)


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


# --- the official script, transcribed ---------------------------------------------------------------------------
# GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at c4e6a0e4: its scoring of one
# question, rule for rule, written apart from stages/metrics/vqa.py. Its contraction table is long; only
# the entries that the cases below can reach are written here (the token alphabet is chosen so that no
# other entry can form).
OFFICIAL_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                  "?", "!"]
OFFICIAL_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
OFFICIAL_ARTICLES = ["a", "an", "the"]
OFFICIAL_CONTRACTIONS = {"dont": "don't", "cant": "can't", "whats": "what's", "twas": "'twas", "oclock": "o'clock",
                         "hed've": "he'd've", "he'dve": "he'd've", "yall'll": "y'all'll", "y'allll": "y'all'll",
                         "somebody'd": "somebodyd", "Im": "I'm", "let's": "let's"}
OFFICIAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
OFFICIAL_COMMA = re.compile(r"(\d)(\,)(\d)")


def _official_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in OFFICIAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or OFFICIAL_COMMA.search(in_text) is not None:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return OFFICIAL_PERIOD.sub("", out_text, count=re.UNICODE)  # (sic) the official passes re.UNICODE as count


def _official_digit_article(in_text: str) -> str:
    out = []
    for word in in_text.lower().split():
        word = OFFICIAL_NUMBERS.get(word, word)
        if word not in OFFICIAL_ARTICLES:
            out.append(word)
    return " ".join(OFFICIAL_CONTRACTIONS.get(word, word) for word in out)


def _official_accuracy(prediction: str, answers: list[str]) -> float:
    """`VQAEval.evaluate` for one question: the answers as the official annotations hold them (dicts
    with distinct answer ids), punctuation-processed in place only when they are not all the same."""
    res_ans = prediction.replace("\n", " ").replace("\t", " ").strip()
    res_ans = _official_digit_article(_official_punctuation(res_ans))
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
    if len(set(a["answer"] for a in gts)) > 1:
        for ans_dic in gts:
            ans_dic["answer"] = _official_punctuation(ans_dic["answer"])
    gt_acc = []
    for gt_ans_datum in gts:
        other_gt_ans = [item for item in gts if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching_ans)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


OFFICIAL_CASES = [
    # (prediction, answers, expected by hand); the transcription above must agree too.
    pytest.param("the", ["the"] * 10, 0.0, id="article-against-identical-refs"),
    # the prediction loses its article (""), ten identical answers are compared as written ("the"): 0
    pytest.param("dog", ["the dog"] * 5 + ["dog"] * 5, 1.0, id="article-in-disagreeing-refs"),
    # answers differ, so only their punctuation goes: "the dog" stays; 5 "dog" match -> 1.0
    pytest.param("dog", ["the dog"] * 8 + ["dog"] * 2, 0.6, id="article-kept-in-refs"),
    # m=2 -> 0.6 (normalised refs would give 1.0)
    pytest.param("two", ["two"] * 10, 0.0, id="number-word-against-identical-refs"),
    # the prediction becomes "2", the answers stay "two": 0
    pytest.param("2", ["two"] * 2 + ["3"] * 8, 0.0, id="number-word-kept-in-refs"),
    # answers differ, punctuation only: "two" stays; m=0
    pytest.param("Yes", ["Yes"] * 10, 0.0, id="case-kept-in-refs"),
    # the prediction is lowercased, the answers not: 0
    pytest.param("yes", ["Yes"] * 3 + ["no"] * 7, 0.0, id="case-kept-in-disagreeing-refs"),
    # answers differ, punctuation only: "Yes" stays; m=0
    pytest.param("yes", [" yes"] * 10, 0.0, id="identical-refs-keep-their-spaces"),
    # the prediction is stripped, the answers not: 0
    pytest.param("yes", ["yes "] * 3 + ["no"] * 7, 0.0, id="disagreeing-refs-keep-their-spaces"),
    # punctuation processing does not strip: "yes " != "yes"; m=0
    pytest.param("yes", ["yes."] * 10, 0.0, id="identical-refs-keep-their-period"),
    # ten identical answers are not processed at all: "yes." != "yes"
    pytest.param("yes", ["yes."] * 2 + ["no"] * 8, 0.6, id="disagreeing-refs-lose-their-period"),
    # answers differ: "yes." -> "yes"; m=2 -> 0.6
    pytest.param("1,000", ["1,000"] * 10, 0.0, id="thousands-comma-in-identical-refs"),
    # prediction "1000"; the answers stay "1,000": 0
    pytest.param("1,000", ["1,000"] * 3 + ["1000"] + ["many"] * 6, 1.0, id="thousands-comma-in-disagreeing-refs"),
    # answers differ: "1,000" -> "1000"; m=4 -> 1.0
    pytest.param("black / white", ["black / white"] * 3 + ["gray"] * 7, 0.0, id="double-space-in-refs"),
    # "/" touches a space, so it is deleted on both sides: the answer keeps two spaces ("black  white"),
    # the prediction is split and joined ("black white"): 0
    pytest.param("dont", ["don't"] * 3 + ["no"] * 7, 0.9, id="contraction-in-prediction"),
    # "dont" -> "don't"; m=3 -> 0.9
    pytest.param("don't", ["dont"] * 10, 0.0, id="contraction-not-in-refs"),
    # the answers stay "dont": 0
    pytest.param("t-shirt", ["t-shirt"] * 10, 0.0, id="hyphen-in-identical-refs"),
    # prediction "t shirt", answers "t-shirt": 0
    pytest.param("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7, 0.9, id="hyphen-in-disagreeing-refs"),
    # answers differ: "t-shirt" -> "t shirt"; m=3 -> 0.9
    pytest.param("it's", ["it's"] * 2 + ["its"] * 8, 0.6, id="apostrophe-kept"),
    # "'" is no official punctuation: "it's" on both sides; m=2 -> 0.6
    pytest.param("." * 33 + "yes", ["yes"] * 10, 0.0, id="at-most-32-periods"),
    # the official call removes at most 32 periods: ".yes" != "yes" (all 33 removed would score 1.0)
]


@pytest.mark.parametrize("prediction, answers, expected", OFFICIAL_CASES)
def test_vqa_accuracy_equals_the_official_script(prediction, answers, expected):
    assert _official_accuracy(prediction, answers) == pytest.approx(expected)
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


# Articles, number words, contractions (no other entry of the official table can form from these),
# apostrophes, case, and every kind of punctuation the rules treat apart.
TRICKY_TOKENS = ["the", "a", "an", "The", "A", "two", "Two", "2", "none", "0", "ten", "10", "dont", "Dont", "don't",
                 "cant", "whats", "hed've", "he'dve", "yall'll", "y'allll", "somebody'd", "twas", "'twas", "oclock",
                 "Im", "let's", "it's", "its", "yes", "Yes", "no", "1,000", "1000", "3.5", "35", "t-shirt",
                 "black/white", "red,", "(dog)", "dog?", "dog!", "[x]", '"hi"', "@home", "a+b", "x=y", "under_score"]
SEPARATORS = [" ", "  ", ", ", " ,", "/", " / ", "-", " - ", ".", ". ", "\t", "\n", ",", "; ", "?", " !"]


@st.composite
def tricky_text(draw):
    tokens = draw(st.lists(st.sampled_from(TRICKY_TOKENS), min_size=1, max_size=4))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(tokens) - 1, max_size=len(tokens) - 1))
    text = tokens[0] + "".join(sep + token for sep, token in zip(seps, tokens[1:]))
    return draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", " ", ".", "\t"]))


@settings(max_examples=400, deadline=None)
@given(pool=st.lists(tricky_text(), min_size=1, max_size=3), prediction=tricky_text(), data=st.data())
def test_vqa_accuracy_equals_the_official_script_on_generated_strings(pool, prediction, data):
    # The answers come from a small pool (some repeated, sometimes all the same) that may hold the
    # prediction, its official normal form, or near misses of that, which only some rules make equal.
    normal = _official_digit_article(_official_punctuation(prediction.strip()))
    near = [prediction, normal, normal.upper(), normal.capitalize(), f" {normal}", f"{normal} ", f"{normal}.",
            f"the {normal}", f"{normal}, {normal}", normal.replace("'", "")]
    pool = pool + data.draw(st.lists(st.sampled_from(near), max_size=2))
    answers = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=10))
    assert vqa_accuracy(prediction, answers) == pytest.approx(_official_accuracy(prediction, answers))


def test_evaluation_normalizes_refs_only_when_asked():
    from pipeline.config import load_config
    from stages.evaluate import score
    from stages.tasks.sample import Sample
    query = Sample("1", "x.jpg", "What is it?", ("the",) * 10)
    assert load_config(None, []).eval.vqa_normalize_refs is False
    assert score("vqa", "vqav2", {"1": "the"}, [query])["vqa_accuracy"] == 0.0  # the official score
    assert score("vqa", "vqav2", {"1": "the"}, [query], normalize_refs=True)["vqa_accuracy"] == 100.0  # "" == ""


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


def _ptb_words(caption: str) -> list[str]:
    """PTB tokenisation of a caption made of words, commas and periods: lowercased, punctuation dropped."""
    assert re.fullmatch(r"[A-Za-z ,.]+", caption), f"{caption!r} needs the real PTB tokenizer"
    return caption.lower().replace(",", " ").replace(".", " ").split()


def _cider_d(predictions: dict, references: dict, n_max: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as the COCO caption evaluation computes it), not ×100.

    Per image: for n = 1..4, the tf-idf vectors of the prediction's and each reference's n-grams, the
    prediction's weights clipped at the reference's, their cosine times a Gaussian penalty on the length
    difference, averaged over the references; then the mean over n, ×10. The idf counts the images whose
    references hold the n-gram, over the whole set. Lengths are word counts (COCO counts bigrams: the same
    difference for captions of two words or more, as here).
    """
    def grams(words):
        return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))

    refs = {k: [_ptb_words(c) for c in v] for k, v in references.items()}
    df = Counter(g for rs in refs.values() for g in set().union(*(grams(r) for r in rs)))
    log_images = math.log(len(refs))

    def tfidf(words):  # per n: {n-gram: weight}, its norm
        vecs = [{g: tf * (log_images - math.log(max(1, df[g]))) for g, tf in grams(words).items() if len(g) == n}
                for n in range(1, n_max + 1)]
        return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]

    scores = []
    for k, rs in refs.items():
        words = _ptb_words(predictions[k])
        (hyp, hyp_norm), per_n = tfidf(words), [0.0] * n_max
        for r in rs:
            ref, ref_norm = tfidf(r)
            penalty = math.exp(-((len(words) - len(r)) ** 2) / (2 * sigma ** 2))
            for n in range(n_max):
                dot = sum(min(w, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, w in hyp[n].items())
                if hyp_norm[n] and ref_norm[n]:
                    per_n[n] += dot / (hyp_norm[n] * ref_norm[n]) * penalty
        scores.append(10 * sum(per_n) / n_max / len(rs))
    return sum(scores) / len(scores)


@needs_java
def test_cider_is_cider_d_times_100_on_tokenized_captions():
    # By hand: each prediction is its only reference, up to case and punctuation. No n-gram is shared
    # between the two images, so each has idf log(2/1) and every cosine is 1 (n = 1..4, 4 words each),
    # with no length penalty: 10 per image, 10 on average, ×100 = 1000. Untokenised text would not match.
    refs = {"1": ["a red apple falls"], "2": ["Two blue birds sing."]}
    assert cider({"1": "A red apple falls.", "2": "two blue birds sing"}, refs) == pytest.approx(1000.0, rel=1e-9)
    assert 100 * _cider_d({"1": "A red apple falls.", "2": "two blue birds sing"}, refs) == pytest.approx(1000.0)

    # Three references per image with shared words, so idf and clipping matter (the reference side has
    # several captions: swapping the sides would not even run).
    expected = 100 * _cider_d(CAPTION_PREDS, CAPTION_REFS)
    assert 50 < expected < 500, expected  # a partial match, far from 0 and from the 1000 of a perfect one
    assert cider(CAPTION_PREDS, CAPTION_REFS) == pytest.approx(expected, rel=1e-9)


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
