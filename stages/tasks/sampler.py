"""In-context demonstration (ICD) sampling, METHOD.md §3.

Deterministic in (seed, query id, view) alone, so any rank, any batch order and any rerun draws the
same demonstrations. The query never demonstrates itself, and no ICD repeats within one prompt.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from stages.errors import UserError


def _rng(seed: int, query_id: str, view: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{query_id}\x00{view}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_icds(support_ids: Sequence[str], query_id: str, k: int, *, seed: int, view: int) -> list[str]:
    """k distinct ids drawn uniformly from support_ids without query_id."""
    n_available = len(support_ids) - (query_id in support_ids)
    if k < 0 or k > n_available:
        raise UserError(f"cannot draw {k} demonstrations: the support set offers {n_available} besides the query "
                        f"(choose --shots between 0 and {n_available}, or a larger support set)")
    picks = _rng(seed, query_id, view).sample(range(len(support_ids)), min(k + 1, len(support_ids)))
    return [support_ids[i] for i in picks if support_ids[i] != query_id][:k]
