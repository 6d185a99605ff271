"""The student's prefetched data path (stages/batches.py): the same micro-batches as the inline loop built, a thread
that stops when the loop leaves an epoch, and errors raised in the loop as they were raised."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import StudentConfig
from stages.batches import Buffers, Prefetch, epoch_batches
from stages.errors import UserError
from stages.models import load_model
from stages.models.tiny import make_model
from stages.batches import batch_builder, make_batch
from stages.tasks.sample import Sample
from storage.errors import StoreError
from storage.reader import TargetReader
from storage.writer import Item
from tests.test_storage import _chunk, make_manifest, write_store

N_LAYERS, D_MODEL = 2, 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Idefics2, a bfloat16 store of its width (14 queries in shards of 3, 2 views) and an image per query."""
    tmp = tmp_path_factory.mktemp("batches")
    lm = load_model(make_model("idefics2", str(tmp / "model"), layers=N_LAYERS, hidden=D_MODEL))
    m = make_manifest(n_queries=14, views=2, shard_size=3, n_layers=N_LAYERS, d_model=D_MODEL, dtype="bfloat16")
    write_store(tmp / "store", m)
    by_id = {}
    for i, q in enumerate(m.query_ids):
        path = str(tmp / f"{q}.png")
        Image.new("RGB", (12 + i, 9), (17 * i, 255 - 9 * i, 3 * i)).save(path)
        by_id[q] = Sample(q, path, "what is it?", ("a",))
    return lm, str(tmp / "store"), by_id


def _inline(lm, by_id, answer_starts, reader, epoch, start, micro, count):
    """The student loop before the prefetch: next items, images, make_batch, then the reader's position."""
    items, out = reader.epoch(epoch, start=start), []
    for _ in range(count):
        group = [next(items) for _ in range(micro)]
        batch = make_batch(lm, group, [[by_id[it.sample_id].load_image()] for it in group], answer_starts)
        out.append(([(it.sample_id, it.view) for it in group], batch, reader.state_dict()))
    items.close()
    return out


def _equal(a: tuple, b: tuple) -> bool:
    """The same tensors bit for bit (the store's bfloat16 values hold every bit pattern, NaNs included)."""
    (inputs_a, *rest_a), (inputs_b, *rest_b) = a, b
    same = lambda x, y: x.dtype == y.dtype and torch.equal(x.contiguous().view(torch.uint8),  # noqa: E731
                                                           y.contiguous().view(torch.uint8))
    return (inputs_a.keys() == inputs_b.keys() and all(same(inputs_a[k], inputs_b[k]) for k in inputs_a)
            and len(rest_a) == len(rest_b) == 3 and all(same(x, y) for x, y in zip(rest_a, rest_b)))


@pytest.mark.parametrize("world, rank, micro, done, prefetch, prefetch_mb", [
    (1, 0, 2, 0, 4, 1024),   # defaults: 2 micro-batches per step of 4
    (1, 0, 1, 2, 1, 1024),   # resumed after 2 steps, one batch ahead at most
    (2, 1, 2, 1, 8, 0),      # rank 1 of 2; a budget of 0 MB: one batch at a time
    (2, 0, 1, 0, 3, 1024),
])
def test_prefetched_batches_equal_the_inline_ones(tiny, world, rank, micro, done, prefetch, prefetch_mb):
    lm, url, by_id = tiny
    s = StudentConfig(global_batch=4, micro_batch=micro, prefetch=prefetch, prefetch_mb=prefetch_mb, shuffle_buffer=5)
    answer_starts = {q: i % 3 for i, q in enumerate(by_id)}
    reader = TargetReader(url, seed=5, shuffle_buffer=5, rank=rank, world_size=world, batch=4)
    epoch = 3  # view 1
    # 14 items an epoch: 3 whole steps of 4; this rank's part of the steps after `done`, `micro` items a batch
    count = (3 - done) * (4 // world) // micro
    want = _inline(lm, by_id, answer_starts, TargetReader(url, seed=5, shuffle_buffer=5, rank=rank, world_size=world,
                                                          batch=4), epoch, 4 * done, micro, count)
    with epoch_batches(reader, epoch, done, s, micro, batch_builder(lm, by_id, answer_starts), "cpu") as batches:
        got = list(batches)
    assert len(got) == count
    for n, (mb, (keys, batch, state)) in enumerate(zip(got, want)):
        assert [(it.sample_id, it.view) for it in mb.items] == keys, n
        assert _equal(mb.tensors, batch), f"micro-batch {n} differs from the inline one"
        assert mb.reader_state == state, n
        assert isinstance(mb.wait_s, float) and mb.wait_s >= 0
    assert got[-1].reader_state["step"] == 12  # the end of the last whole step, as a checkpoint records it


@pytest.mark.parametrize("world, rank, micro", [(1, 0, 2), (2, 1, 1)])
def test_prefetch_runs_on_across_epochs_with_each_epochs_batches(tiny, world, rank, micro):
    """until=E: one prefetch gives, in order, exactly what one per epoch gives (epoch 2 resumed after one step,
    then epochs 3 and 4 whole: the views alternate), each batch with its own epoch's reader position."""
    lm, url, by_id = tiny
    s = StudentConfig(global_batch=4, micro_batch=micro, prefetch=2, shuffle_buffer=5)
    per_rank = 4 // world // micro  # micro-batches of this rank per step; 3 whole steps an epoch
    want = []
    for epoch, done in ((2, 1), (3, 0), (4, 0)):
        fresh = TargetReader(url, seed=5, shuffle_buffer=5, rank=rank, world_size=world, batch=4)
        want += _inline(lm, by_id, {}, fresh, epoch, 4 * done, micro, (3 - done) * per_rank)
    reader = TargetReader(url, seed=5, shuffle_buffer=5, rank=rank, world_size=world, batch=4)
    with epoch_batches(reader, 2, 1, s, micro, batch_builder(lm, by_id, {}), "cpu", until=5) as batches:
        got = list(batches)
    assert len(got) == len(want) == 8 * per_rank
    for n, (mb, (keys, batch, state)) in enumerate(zip(got, want)):
        assert [(it.sample_id, it.view) for it in mb.items] == keys, n
        assert _equal(mb.tensors, batch), f"micro-batch {n} differs from its epoch's own"
        assert mb.reader_state == state, n
    assert [mb.reader_state["epoch"] for mb in got] == [2] * 2 * per_rank + [3] * 3 * per_rank + [4] * 3 * per_rank
    # A run resumed after its last step (epoch = until) gets no batch, and its reader starts no epoch.
    reader.epoch = lambda *a, **k: pytest.fail("a finished run read an epoch")
    with epoch_batches(reader, 5, 0, s, micro, batch_builder(lm, by_id, {}), "cpu", until=5) as batches:
        assert list(batches) == []


def test_what_waits_ready_is_bounded_by_depth_and_by_bytes():
    """At most `depth` micro-batches wait ready, and at most `max_bytes` of them (one always goes through); the
    thread holds one more, built, until there is room for it."""
    built = []

    def items():  # 100 bytes of targets an item
        for _ in range(60):
            yield SimpleNamespace(hidden=torch.zeros(25))

    def build(group):  # 800 + 200 bytes of tensors: with its 2 items, 1200 bytes a micro-batch
        built.append(len(group))
        return {"input_ids": torch.zeros(200)}, torch.zeros(50), torch.zeros(0), torch.zeros(0)

    for depth, max_bytes, ready in ((3, 10**6, 3), (10, 2500, 2), (10, 1199, 1), (10, 0, 1)):
        built.clear()
        with Prefetch(items(), build, micro=2, reader_state=dict, depth=depth, max_bytes=max_bytes) as batches:
            next(batches)
            expected = 1 + ready + 1  # taken, waiting ready, held by the thread
            deadline = time.monotonic() + 300  # generous: on a loaded machine the thread may wait long for a core
            while len(built) < expected and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # time to build more than it may
            assert len(built) == expected, (depth, max_bytes, built)


def test_leaving_an_epoch_early_stops_both_prefetch_threads(tiny):
    # Watch this epoch's own threads: a reader left open by an earlier test must not decide this one.
    lm, url, by_id = tiny
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="the loop stops"):  # as when the loss is not finite
        with epoch_batches(TargetReader(url, seed=0, batch=4, prefetch=1), 0, 0, StudentConfig(global_batch=4, prefetch=1),
                           2, batch_builder(lm, by_id, {}), "cpu") as batches:
            next(batches)
            mine = [t for t in threading.enumerate() if t not in before]
            raise RuntimeError("the loop stops")
    names = sorted(t.name for t in mine)
    assert "batch-prefetch" in names and "store-prefetch" in names, names
    for t in mine:  # the store's read pool ("store-read_N") too
        t.join(timeout=300)  # generous: on a loaded machine a thread may wait long for a core
        assert not t.is_alive(), f"{t.name} thread still running 300 s after the loop left the epoch"


def test_an_image_error_reaches_the_loop_in_its_place(tiny, tmp_path):
    lm, url, by_id = tiny
    s = StudentConfig(global_batch=4)
    order = [it.sample_id for it in TargetReader(url, seed=0, batch=4).epoch(0)]
    bad = order[5]  # in the third micro-batch of 2
    missing = str(tmp_path / "gone.jpg")
    samples = {**by_id, bad: Sample(bad, missing, "what is it?", ("a",))}
    got, reading, before = [], [], set(threading.enumerate())
    with pytest.raises(UserError) as raised:
        with epoch_batches(TargetReader(url, seed=0, batch=4, prefetch=1), 0, 0, s, 2, batch_builder(lm, samples, {}),
                           "cpu") as batches:
            for mb in batches:
                got.append(mb)
                reading = reading or [t for t in threading.enumerate() if t not in before and t.name == "store-prefetch"]
    assert str(raised.value) == f"image file not found: {missing} (sample {bad})"  # Sample.load_image's one line
    assert [it.sample_id for mb in got for it in mb.items] == order[:4]
    # The error's traceback (held here) keeps the thread's frame, and so the reader's epoch, alive: the thread
    # must close the epoch itself, not leave it to the garbage collector.
    assert len(reading) == 1
    reading[0].join(timeout=300)
    assert not reading[0].is_alive(), "the reader's prefetch thread still runs 300 s after the error reached the loop"


def test_a_store_error_reaches_the_loop_as_it_was_raised(tiny, tmp_path):
    lm, _, by_id = tiny
    m = make_manifest(n_queries=6, views=1, shard_size=2, n_layers=N_LAYERS, d_model=D_MODEL)
    write_store(tmp_path, m)
    chunk = _chunk(tmp_path, 1, "hidden")
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match="shard 1: cannot read .*hidden.*run `pipeline cache verify"):
        with epoch_batches(TargetReader(str(tmp_path), seed=0, batch=2), 0, 0, StudentConfig(global_batch=2), 1,
                           batch_builder(lm, by_id, {}), "cpu") as batches:
            list(batches)


def test_a_buffer_in_use_is_never_handed_out_again():
    """Buffers hands a buffer out again only once no tensor uses its memory, a view of it included."""
    buffers = Buffers(keep=2)
    first = buffers.empty((4, 8), torch.bfloat16)
    where = first.data_ptr()
    view = first[1:]  # a slice, as a step may still hold
    view.fill_(5)
    del first
    second = buffers.empty((4, 8), torch.bfloat16)
    assert second.data_ptr() != where
    second.fill_(-1)
    assert (view == 5).all()
    del view
    third = buffers.empty((2, 8), torch.float32)  # smaller, in another dtype: the freed buffer serves it
    assert third.shape == (2, 8) and third.dtype == torch.float32 and third.data_ptr() == where
    larger = buffers.empty((64, 8), torch.float32)  # too large for both (in use anyway): new memory
    assert larger.data_ptr() not in (where, second.data_ptr())
    larger.fill_(3)
    assert (second == -1).all()


def test_a_reused_buffer_builds_the_batch_a_fresh_one_does(tiny):
    """make_batch writes every position of its target: what a reused buffer held before (NaN here) never shows
    through the padding or a span token without a stored row."""
    lm, _, _ = tiny
    rng = np.random.default_rng(0)

    def item(q: str, keep: list[int]) -> Item:
        rows = rng.standard_normal((sum(keep), N_LAYERS, D_MODEL), dtype=np.float32)
        return Item(q, 0, np.arange(7, 7 + len(keep), dtype=np.int32), torch.from_numpy(rows).to(torch.bfloat16), (),
                    np.array(keep, dtype=bool))

    buffers = Buffers(keep=1)
    _, used, _, _ = make_batch(lm, [item("a", [1] * 6), item("b", [1] * 6)], [[], []], empty=buffers.empty)
    used.fill_(float("nan"))
    where = used.data_ptr()
    del used
    short = [item("c", [1, 0]), item("d", [1, 1, 0, 1])]  # a padded row, tokens without a stored row
    got = make_batch(lm, short, [[], []], empty=buffers.empty)
    assert got[1].data_ptr() == where  # the same memory, handed out again
    want = make_batch(lm, short, [[], []])
    assert _equal(got, want) and not torch.isnan(want[1]).any()
