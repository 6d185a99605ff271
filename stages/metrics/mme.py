"""The MME score, as the official MME evaluation (`calculation.py` of the MME release) computes it.

A generation answers "yes" when it is "yes" (any case) or its first four characters hold "yes", "no"
likewise, else it answers neither and is wrong. Per subtask: acc = % of questions right, acc+ = % of images
with every question right (MME asks two per image); the subtask's score is acc + acc+ (at most 200).
Perception sums the scores of the 10 perception subtasks (at most 2000), cognition those of the 4 cognition
subtasks (at most 800), over the subtasks evaluated. The plain accuracy over all questions is reported too:
it is what the MimIC authors' code reports and what their Tab. 10 compares.
"""
from __future__ import annotations

from stages.tasks.mme import COGNITION, PERCEPTION


def parse_yes_no(text: str) -> str:
    """"yes", "no" or "other", by the official rule."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(predictions: dict[str, str], queries) -> dict:
    """queries: Samples with answers ("Yes",) or ("No",), the image they ask about, their subtask as category."""
    subtasks: dict[str, dict] = {}
    for q in queries:
        right = parse_yes_no(predictions[q.id]) == q.answers[0].lower()
        tally = subtasks.setdefault(q.category, {"right": 0, "n": 0, "images": {}})
        tally["right"] += right
        tally["n"] += 1
        tally["images"][q.image] = tally["images"].get(q.image, True) and right
    per = {}
    for name, t in subtasks.items():
        acc, acc_plus = 100.0 * t["right"] / t["n"], 100.0 * sum(t["images"].values()) / len(t["images"])
        per[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"accuracy": 100.0 * sum(t["right"] for t in subtasks.values()) / len(queries),
            "perception": sum((per[s]["score"] for s in PERCEPTION if s in per), 0.0),
            "cognition": sum((per[s]["score"] for s in COGNITION if s in per), 0.0),
            "subtasks": per}
