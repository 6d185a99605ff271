"""The cover ICD sampler (issue 8): one demonstration per answer value, round after round, deterministic."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from stages.errors import UserError
from stages.tasks.sampler import sample_icds


@st.composite
def support_with_answers(draw):
    n = draw(st.integers(2, 40))
    ids = [f"q{i}" for i in range(n)]
    answers = draw(st.lists(st.sampled_from("abcdefgh"), min_size=n, max_size=n))
    query = draw(st.sampled_from(ids + ["outside"]))
    return ids, answers, query


@settings(max_examples=200, deadline=None)
@given(support_with_answers(), st.data(), st.integers(0, 5), st.integers(0, 3))
def test_cover_draws_distinct_ids_never_the_query_and_covers_the_answers(swa, data, seed, view):
    ids, answers, query = swa
    answer_of = dict(zip(ids, answers))
    n_available = len(ids) - (query in ids)
    k = data.draw(st.integers(0, n_available))
    picks = sample_icds(ids, query, k, seed=seed, view=view, sampler="cover", answers=answers)
    assert len(picks) == k and len(set(picks)) == k and query not in picks and set(picks) <= set(ids)
    assert picks == sample_icds(ids, query, k, seed=seed, view=view, sampler="cover", answers=answers)
    # Round after round: a value is shown a second time only once every value with members left was shown.
    counts = Counter(answer_of[p] for p in picks)
    left = Counter(answer_of[i] for i in ids if i != query)
    n_groups = len(left)
    for i, p in enumerate(picks):
        round_ = sum(answer_of[q] == answer_of[p] for q in picks[:i])
        shown_fewer = [a for a in left if left[a] > round_ and sum(answer_of[q] == a for q in picks[:i]) < round_]
        assert not shown_fewer, (picks, i)
    if k >= n_groups:
        assert set(counts) == set(left)  # every answer value appears


def test_cover_shows_each_of_8_answers_once_at_k8_in_varying_order():
    ids = [f"q{i}" for i in range(64)]
    answers = [f"w{i % 8}" for i in range(64)]
    orders = set()
    for q in ids[:20]:
        picks = sample_icds(ids, q, 8, seed=0, view=0, sampler="cover", answers=answers)
        shown = [answers[ids.index(p)] for p in picks]
        assert sorted(shown) == [f"w{i}" for i in range(8)]
        orders.add(tuple(shown))
    assert len(orders) > 10  # the group order is drawn per query
    a = sample_icds(ids, "q0", 16, seed=0, view=0, sampler="cover", answers=answers)
    assert a != sample_icds(ids, "q0", 16, seed=0, view=1, sampler="cover", answers=answers)
    assert a != sample_icds(ids, "q0", 16, seed=1, view=0, sampler="cover", answers=answers)


def test_cover_refuses_more_shots_than_the_support_offers():
    with pytest.raises(UserError, match="cannot draw 3"):
        sample_icds(["a", "b", "c"], "a", 3, seed=0, view=0, sampler="cover", answers=["x", "y", "x"])


def test_uniform_is_unchanged_by_the_new_arguments():
    ids = [f"q{i}" for i in range(30)]
    assert sample_icds(ids, "q3", 7, seed=2, view=1) == sample_icds(ids, "q3", 7, seed=2, view=1, sampler="uniform",
                                                                    answers=["a"] * 30)


def test_config_takes_the_sampler_and_the_fingerprint_records_it():
    from stages.teacher import fingerprint_fields
    cfg = load_config(None, ["teacher.sampler=cover", "eval.sampler=cover"])
    assert cfg.teacher.sampler == "cover" and cfg.eval.sampler == "cover"
    assert fingerprint_fields(cfg, None, "vqa")["sampler"] == "cover"
    assert fingerprint_fields(load_config(None, []), None, "vqa")["sampler"] == "uniform"
    with pytest.raises(UserError, match="teacher.sampler"):
        load_config(None, ["teacher.sampler=nearest"])
