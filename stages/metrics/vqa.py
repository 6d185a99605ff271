"""VQA accuracy for one question, as the official VQA evaluation computes it.

The rules follow the official script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py,
`processPunctuation`, `processDigitArticle` and the leave-one-out loop in `evaluate`); the tables below
are written out here, and the quirks of that script that change a score are kept on purpose and marked.

As in the official script, the prediction is normalised in full, but the reference answers only for
punctuation, and only when the annotators disagree: ten identical answers are compared as they are
written. The released VQAv2 annotations are already in normal form, so this rarely matters there; on
answers that are not ("the" ten times, "1,000" ten times) a prediction can score 0 whatever it says.
normalize_refs=True (eval.vqa_normalize_refs) normalises the reference answers in full too, for raw
answer lists (OK-VQA raw answers, data of your own); it is not the official score.
"""
from __future__ import annotations

import re

from stages.errors import UserError

# Punctuation the official script removes or turns into a space. "." is handled apart (decimals
# keep theirs); "'" is absent, so contractions and possessives survive; "!" and "-" are in it, so
# "t-shirt" becomes "t shirt".
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit: "yes." -> "yes", "3.5" stays. (The official pattern starts
# with "(?!<=\d)", a mistyped look-behind that never matches anything, so only this part acts.)
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (= 32) where `count` goes, so at most 32 periods are removed.
_PERIOD_MAX_REMOVED = 32

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions that annotators type without their apostrophes. The official table maps each
# apostrophe-less spelling back: "dont" -> "don't". For contractions with two or more apostrophes it
# lists instead every spelling that lacks exactly one of them ("hed've" and "he'dve" -> "he'd've"),
# never the bare "hedve". Its capitalised entries ("Im", "Ive", "Id've") can never match, since words
# are lowercased first, so they are left out; its identity entries ("let's", "she's") change nothing.
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll
how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't
should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll
that's there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll
what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's
won't would've wouldn't y'all you'd you'll you're you've
couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've someone'd've
something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've you'd've 'ow's'at
""".split()


def _apostrophe_less_spellings(form: str) -> list[str]:
    """The spellings of `form` that the official table maps back to it (see above)."""
    cuts = [i for i, ch in enumerate(form) if ch == "'"]
    if len(cuts) == 1:
        return [form.replace("'", "")]
    return [form[:i] + form[i + 1 :] for i in cuts]


_CONTRACTIONS = {spelling: form for form in _CONTRACTED_FORMS for spelling in _apostrophe_less_spellings(form)}
# (sic) The official table has this one entry backwards; kept so predictions score the same.
_CONTRACTIONS["somebody'd"] = "somebodyd"


def _strip_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop each mark, or turn it into a space.

    A mark is dropped when it touches a space somewhere in the text ("red, blue" -> "red blue") or
    when the text holds a digit-comma-digit ("1,000" -> "1000"); otherwise it becomes a space
    ("black/white" -> "black white"). Both tests look at the input text, not the running result.
    """
    joins_digits = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if joins_digits or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVED)


def _map_words(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """One answer in the official normal form: "Two dogs." -> "2 dogs", "dont" -> "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


def _stem_okvqa(text: str) -> str:
    """Singular nouns and verb lemmas of -ing words, for OK-VQA: "surfboards" -> "surfboard", "skiing" -> "ski".

    This approximates, and is not, the stemmer OK-VQA evaluations usually run (OpenFlamingo's
    `OKVQAStemmer`, written to reproduce the OK-VQA v1.1 `answers` field from `raw_answers`). That one
    POS-tags the words with NLTK, lemmatises words ending in "ing" as verbs with WordNet, singularises
    words tagged NNS/NNPS with `inflection`, and first applies a hand-made table of about 180 words
    read off the v1.1 data ("clothes" -> "cloth", "morning" -> "morn"). NLTK's tagger and WordNet
    data are downloads, not PyPI packages, so they cannot be installed here. Instead we use
    lemminflect, whose English lexicon ships inside its wheel: a word ending in "ing" that the lexicon
    knows as a verb form becomes its verb lemma, and any other word that the lexicon knows as a noun
    form becomes its (first) noun lemma, so plurals become singular and unknown words stay as they
    are. Known differences: no sentence context (a plural is singularised even where a tagger would
    call it a verb), no v1.1 table ("clothes" stays, "leaves" -> "leave" where v1.1 has "leaf"), and
    lemminflect's lexicon where the reference uses WordNet and `inflection`'s suffix rules; and it runs
    on normalised text (lowercase, punctuation gone), where the reference stems the raw generation.
    Scores are therefore close to, not identical with, published OK-VQA numbers.
    """
    try:
        from lemminflect import getLemma
    except ImportError as e:
        raise ImportError("OK-VQA stemming needs lemminflect: pip install lemminflect==0.2.3") from e
    words = []
    for word in text.split():
        pos = "VERB" if word.endswith("ing") else "NOUN"
        # lemmatize_oov=False: a word the lexicon does not know stays as it is (WordNet does the same).
        lemmas = getLemma(word, upos=pos, lemmatize_oov=False)
        words.append(lemmas[0] if lemmas else word)
    return " ".join(words)


def _official_refs(answers: list[str]) -> list[str]:
    """The official script's reference answers: punctuation stripped when the annotators disagree (raw
    answers, no lowercasing, number words, articles or contractions), else as they are."""
    if len(set(answers)) > 1:
        return [_strip_punctuation(a) for a in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: list[str], *, stem: bool = False, normalize_refs: bool = False) -> float:
    """Official VQA accuracy of one prediction against its annotators' answers, in [0, 1].

    Each of the n answers (10 in VQAv2 and OK-VQA) is left out in turn; the prediction scores
    min(1, matches among the other n-1 / 3) against the rest, and the n scores are averaged. With
    10 answers, 1, 2, 3 and 4+ matching annotators give 0.3, 0.6, 0.9 and 1.0.
    normalize_refs=True normalises the answers in full, as the prediction (the official script
    strips only their punctuation, see the module docstring).
    stem=True adds the OK-VQA singular/lemma step (see `_stem_okvqa` for how it differs from the
    usual one) after normalisation, to the prediction and the answers alike: the reference stems only
    the prediction, since v1.1 `answers` are already stemmed. Stemming those again mostly leaves them
    as they are ("children", kept by v1.1, becomes "child", but so does a predicted "children"), and
    raw answers, with normalize_refs, get the same treatment as the prediction.
    """
    if not answers:
        raise UserError(
            f"VQA question has no reference answers (prediction {prediction!r}); "
            "every question needs its annotators' answers"
        )
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers] if normalize_refs else _official_refs(answers)
    if stem:
        pred, refs = _stem_okvqa(pred), [_stem_okvqa(r) for r in refs]
    n_matching = sum(r == pred for r in refs)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    scores = [min(1.0, (n_matching - (r == pred)) / 3) for r in refs]
    return sum(scores) / len(scores)
