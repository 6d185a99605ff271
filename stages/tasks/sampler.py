"""In-context demonstration (ICD) sampling, METHOD.md §3.

Deterministic in (seed, query id, view) alone, so any rank, any batch order and any rerun draws the
same demonstrations. The query never demonstrates itself, nor any id in `exclude` (with exclude_same_image,
the other samples that show the query's picture), and no ICD repeats within one prompt.

Two samplers: `uniform` (k ids uniformly without replacement, as the authors) and `cover`, which covers
the answer values: the support set is grouped by reference answer, the groups are visited in a seeded
random order taking one random member of each, round after round, until k. With k at least the number
of answers, every answer is shown (issue 8: on the toy ICL task a k-shot prompt then holds the answer).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence

from stages.errors import UserError


def _rng(seed: int, query_id: str, view: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{query_id}\x00{view}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


SAMPLERS = ("uniform", "cover")


def sample_icds(support_ids: Sequence[str], query_id: str, k: int, *, seed: int, view: int, sampler: str = "uniform",
                answers: Sequence[str] | None = None, exclude: Collection[str] = ()) -> list[str]:
    """k distinct ids from support_ids, neither query_id nor in exclude; answers[i]: support_ids[i]'s
    reference answer (cover only)."""
    banned = {query_id, *exclude}
    n_available = len(support_ids) - len(banned.intersection(support_ids))
    if k < 0 or k > n_available:
        raise UserError(_too_few(k, n_available, len(banned.difference([query_id]).intersection(support_ids))))
    if sampler == "cover":
        if answers is None or len(answers) != len(support_ids):
            raise ValueError("the cover sampler needs one reference answer per support id")
        return _cover(support_ids, answers, banned, k, _rng(seed, query_id, view))
    if sampler != "uniform":
        raise UserError(f"unknown ICD sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    # A uniform draw with the banned ids left out is uniform over the rest; with nothing excluded
    # this draws k + 1, as before the option existed, so default draws did not change.
    picks = _rng(seed, query_id, view).sample(range(len(support_ids)), min(k + len(banned), len(support_ids)))
    return [support_ids[i] for i in picks if support_ids[i] not in banned][:k]


def _too_few(k: int, n_available: int, n_same_picture: int) -> str:
    if not n_same_picture:
        return (f"cannot draw {k} demonstrations: the support set offers {n_available} besides the query "
                f"(choose --shots {n_available} or fewer, or a larger support set: more task.num_queries or "
                "task.support=train)")
    return (f"cannot draw {k} demonstrations: the support set offers {n_available} besides the query and the "
            f"{n_same_picture} other sample(s) that show its picture (choose --shots {n_available} or fewer, "
            "a larger support set: more task.num_queries or task.support=train, or exclude_same_image off)")


def _cover(support_ids: Sequence[str], answers: Sequence[str], banned: set[str], k: int, rng: random.Random) -> list[str]:
    groups: dict[str, list[str]] = {}
    for sid, answer in zip(support_ids, answers):
        if sid not in banned:
            groups.setdefault(answer, []).append(sid)
    order = sorted(groups)  # sorted first, so the draw does not depend on where answers first appear
    rng.shuffle(order)
    members = [rng.sample(groups[a], len(groups[a])) for a in order]  # each group in a random order
    picks: list[str] = []
    for round_ in range(max((len(m) for m in members), default=0)):  # none when k = 0 and all are banned
        picks += [m[round_] for m in members if round_ < len(m)]
        if len(picks) >= k:
            break
    return picks[:k]
