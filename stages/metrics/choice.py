"""Multiple-choice accuracy (SEED-Bench, MMMU-Pro): the option letter parsed from the generation, ×100.

A generation names a letter when, ignoring case and surrounding space, it is
    the letter alone, bare or marked: "B", "(B)", "B.", "B)", "B:";
    the letter marked, then more text: "B. a dog", "(B) a dog", "B: a dog";
    "answer is B", "answer: B", "option B" anywhere, the letter then ending the text or a clause ("B.", "B,").
A bare letter followed by more text is not an answer ("A man on a horse" names no letter), and a letter past
the question's last option is not one either. Unparseable output counts as wrong; the authors' code puts a
random letter in its place, which unparsed="random" does (seeded by the query id, so reruns agree).
"""
from __future__ import annotations

import random
import re

LETTERS = "ABCDEFGHIJ"
_MARKED = r"\(?([A-J])(?:\)|\.|:)?"
_ALONE = re.compile(rf"^{_MARKED}$", re.IGNORECASE)
_LEADING = re.compile(r"^\(?([A-J])(?:\)|\.|:)\s", re.IGNORECASE)
_STATED = re.compile(rf"\b(?:answer is|answer:|option)\s*{_MARKED}(?=$|[.,;!])", re.IGNORECASE)


def parse_letter(text: str, n_options: int) -> str | None:
    """The option letter the generation names (upper case), or None."""
    text = text.strip()
    match = _ALONE.match(text) or _LEADING.match(text) or _STATED.search(text)
    letter = match.group(1).upper() if match else None
    return letter if letter is not None and letter in LETTERS[:n_options] else None


def choice_scores(predictions: dict[str, str], queries, *, unparsed: str = "wrong", seed: int = 0) -> dict:
    """accuracy (×100) over the queries (Samples with options and the right letter as answers[0]), how many
    generations named no letter, and the accuracy per category (SEED-Bench dimension, MMMU-Pro subject)."""
    right, n_unparsed, by_category = 0, 0, {}
    for q in queries:
        letter = parse_letter(predictions[q.id], len(q.options))
        if letter is None:
            n_unparsed += 1
            if unparsed == "random":
                letter = random.Random(f"{seed}\x00{q.id}").choice(LETTERS[: len(q.options)])
        hit = letter == q.answers[0]
        right += hit
        tally = by_category.setdefault(q.category, [0, 0])
        tally[0] += hit
        tally[1] += 1
    return {"accuracy": 100.0 * right / len(queries), "unparsed": n_unparsed,
            "accuracy_by_category": {c: 100.0 * r / n for c, (r, n) in sorted(by_category.items())}}
