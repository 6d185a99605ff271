"""TargetReader: shuffled epochs, view = epoch % V, determinism, exact resume, prefetch errors."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.errors import StoreError
from storage.reader import TargetReader, _buffer_shuffle
from tests.test_storage import _chunk, assert_same_item, make_manifest, write_store

SKIPPED = {2: {"q11": "question is empty"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """23 queries in 5 shards of 5 (the last holds 3), 3 views, one query skipped: 22 items per epoch."""
    url = str(tmp_path_factory.mktemp("store"))
    m = make_manifest(n_queries=23, views=3, shard_size=5, dtype="bfloat16")
    return url, m, write_store(url, m, skipped=SKIPPED)


def keys(items) -> list[tuple[str, int]]:
    return [(it.sample_id, it.view) for it in items]


def test_each_epoch_yields_every_kept_query_once_with_view_epoch_mod_v(store):
    url, m, written = store
    reader = TargetReader(url, seed=3, shuffle_buffer=4)
    assert len(reader) == 22
    for epoch in range(4):
        items = list(reader.epoch(epoch))
        assert Counter(it.sample_id for it in items) == Counter(q for q in m.query_ids if q != "q11")
        assert {it.view for it in items} == {epoch % 3}
        for it in items:
            assert_same_item(it, written[it.sample_id, it.view])


def test_order_is_deterministic_for_a_seed_and_differs_across_seeds_and_epochs(store):
    url, _, _ = store
    a = keys(TargetReader(url, seed=7).epoch(1))
    assert keys(TargetReader(url, seed=7, prefetch=1).epoch(1)) == a  # prefetch never changes the order
    assert [q for q, _ in keys(TargetReader(url, seed=8).epoch(1))] != [q for q, _ in a]
    reader = TargetReader(url, seed=7)
    assert [q for q, _ in keys(reader.epoch(4))] != [q for q, _ in a]  # same view (4 % 3 == 1), other order


def test_without_buffer_each_shard_is_contiguous(store):
    url, m, _ = store
    order = TargetReader(url, seed=1, shuffle_buffer=0).order(0)
    runs = [s for i, (s, _) in enumerate(order) if i == 0 or order[i - 1][0] != s]
    assert sorted(runs) == list(range(m.n_shards))  # each shard appears as one run


@pytest.mark.parametrize("start", [0, 1, 9, 21, 22])
def test_resume_at_start_gives_exactly_the_tail(store, start):
    url, _, _ = store
    full = list(TargetReader(url, seed=5, shuffle_buffer=6).epoch(2))
    tail = list(TargetReader(url, seed=5, shuffle_buffer=6).epoch(2, start=start))
    assert len(tail) == 22 - start
    for got, want in zip(tail, full[start:]):
        assert_same_item(got, want)


def test_state_dict_round_trip(store):
    url, m, _ = store
    reader = TargetReader(url, seed=11)
    it = reader.epoch(3)
    consumed = [next(it) for _ in range(7)]
    state = reader.state_dict()
    assert (state["epoch"], state["step"]) == (3, 7)
    it.close()
    rest = list(reader.epoch(3))[7:]
    resumed = TargetReader(url, seed=11)
    resumed.load_state_dict(state)
    got = list(resumed.epoch(state["epoch"], start=state["step"]))
    assert keys(consumed + got) == keys(list(TargetReader(url, seed=11).epoch(3)))
    assert keys(got) == keys(rest)
    assert resumed.state_dict()["step"] == len(resumed)
    with pytest.raises(StoreError, match="seed 11, this reader has seed 12"):
        TargetReader(url, seed=12).load_state_dict(state)


def test_abandoned_epoch_stops_its_prefetch_thread(store):
    # Watch this epoch's own thread: a reader left open by an earlier test (its generator kept alive by a
    # saved traceback) must not decide this one.
    url, _, _ = store
    before = set(threading.enumerate())
    it = TargetReader(url, seed=0, prefetch=1).epoch(0)
    next(it)
    started = [t for t in threading.enumerate() if t not in before and t.name == "store-prefetch"]
    assert len(started) == 1
    it.close()
    started[0].join(timeout=300)  # generous: on a loaded machine the thread may wait long for a core
    assert not started[0].is_alive(), "prefetch thread still running 300 s after the epoch was closed"


def test_read_error_in_the_prefetch_thread_reaches_the_consumer(tmp_path):
    m = make_manifest(n_queries=6, shard_size=2)
    write_store(tmp_path, m)
    chunk = _chunk(tmp_path, 1, "hidden")
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match="shard 1: cannot read .*hidden.*run `pipeline cache verify"):
        list(TargetReader(str(tmp_path), seed=0).epoch(0))


def test_incomplete_store_needs_consent(tmp_path):
    m = make_manifest(n_queries=12, shard_size=2)
    write_store(tmp_path, m, shards=[0, 3, 5])
    with pytest.raises(StoreError, match=r"incomplete: 3 of 6 shards are not published \(1, 2, 4\); rerun the teacher"):
        TargetReader(str(tmp_path), seed=0)
    reader = TargetReader(str(tmp_path), seed=0, require_complete=False)
    assert len(reader) == 6
    assert {it.sample_id for it in reader.epoch(0)} == {"q0", "q1", "q6", "q7", "q10", "q11"}


@given(stream=st.lists(st.integers(), max_size=60), size=st.integers(0, 20), seed=st.integers(0, 2**32))
def test_buffer_shuffle_is_a_permutation(stream, size, seed):
    import numpy as np

    out = _buffer_shuffle(list(stream), size, np.random.default_rng(seed))
    assert sorted(out) == sorted(stream)
    if size <= 1:
        assert out == stream


# -- data parallel: each rank its own part of every global step, and only its bytes -------------------
@pytest.mark.parametrize("world, batch", [(2, 4), (3, 6), (4, 4), (2, 10)])
def test_every_global_step_trains_the_same_items_whatever_the_world_size(store, world, batch):
    """Rank r of W yields the r-th of W equal parts of each step of the one-rank order; items past the last
    whole step are dropped by every world size alike."""
    url, _, written = store
    single = keys(TargetReader(url, seed=4, shuffle_buffer=5).epoch(1))  # the global order, one item per step
    steps = len(single) // batch
    per_rank = [list(TargetReader(url, seed=4, shuffle_buffer=5, rank=r, world_size=world, batch=batch).epoch(1))
                for r in range(world)]
    part = batch // world
    assert all(len(items) == steps * part for items in per_rank)
    for g in range(steps):
        got = [keys(items[g * part:(g + 1) * part]) for items in per_rank]
        assert sum(got, []) == single[g * batch:(g + 1) * batch], f"step {g}"
    for items in per_rank:
        for it in items:
            assert_same_item(it, written[it.sample_id, it.view])


def test_a_rank_reads_only_the_rows_of_its_own_items(store, monkeypatch):
    """Every byte range a rank asks of `hidden` is one of its items' rows, and together they are exactly those."""
    from storage._root import Root

    url, m, written = store
    asked = []
    real = Root.read_range

    def record(self, rel, start, end):
        asked.append((rel, start, end))
        return real(self, rel, start, end)

    monkeypatch.setattr(Root, "read_range", record)
    items = list(TargetReader(url, seed=2, rank=1, world_size=2, batch=4).epoch(0))
    row_bytes = m.n_layers * m.d_model * 2  # bfloat16
    assert all(rel.endswith("/hidden/0.0.0") for rel, _, _ in asked)
    assert sorted(end - start for _, start, end in asked) == sorted(
        written[it.sample_id, it.view].hidden.shape[0] * row_bytes for it in items)
    assert len(set(asked)) == len(asked)  # no range read twice


def test_a_rank_resumes_at_a_step_boundary(store):
    url, _, _ = store
    full = TargetReader(url, seed=6, rank=0, world_size=2, batch=4)  # rank 0: its part ends before its steps do
    it = full.epoch(2)
    for _ in range(4):  # two steps of this rank's part (2 items each)
        next(it)
    state = full.state_dict()
    assert state["step"] == 8  # two global steps of 4 items
    rest = list(it)
    resumed = TargetReader(url, seed=6, rank=0, world_size=2, batch=4)
    resumed.load_state_dict(state)
    assert keys(resumed.epoch(2, start=state["step"])) == keys(rest)
    with pytest.raises(ValueError, match="multiple of the batch"):
        next(resumed.epoch(2, start=3))
