"""The student's data path behind a prefetch: a background thread takes the rank's items of an epoch from the
reader, decodes their images and builds the micro-batches (model inputs and aligned targets) on the CPU, so
that the training loop finds each one ready instead of building it between two steps.

What waits ready is bounded twice: at most `depth` micro-batches and at most `max_bytes` of their tensors and
items. One micro-batch is always let through, however large, so a budget below one batch slows the loop down
but never stops it. The order and content are the inline loop's: micro-batch n is build() of items
[n·micro, (n+1)·micro) of the same iterator.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import sys
import threading
import time
from collections.abc import Callable, Generator

import numpy as np
import torch

from stages.models.encode import inputs_from_spans


@dataclasses.dataclass
class MicroBatch:
    items: list           # the store items it was built from (LIVE's loss reads their teacher logits)
    tensors: tuple        # what build() returned, on the CPU: (inputs dict, target, span_mask, ce_mask)
    nbytes: int           # its tensors' bytes and its items' targets
    reader_state: dict    # the reader's position after its last item: the checkpoint's at the end of a step
    wait_s: float = 0.0   # seconds the training loop waited for it

    def to(self, device) -> tuple:
        """The tensors on `device` (asynchronous from pinned memory)."""
        inputs, *rest = self.tensors
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return {k: move(v) for k, v in inputs.items()}, *map(move, rest)


def _nbytes(tensors: tuple, items: list) -> int:
    inputs, *rest = tensors
    return (sum(x.nbytes for x in (*inputs.values(), *rest) if isinstance(x, torch.Tensor))
            + sum(it.hidden.nbytes for it in items))


class Buffers:
    """Host memory for micro-batch targets that is handed out again once nothing uses it, so that its pages are
    faulted in once rather than once per batch: at real width a fresh target costs more CPU in first touches than
    in filling it (BENCHMARKS.md, P6).

    Each buffer is a numpy array wrapped by torch.from_numpy, whose storage holds a reference to the array for as
    long as any tensor or view of it lives; so the array's reference count says whether a batch, a step or anything
    else still holds it, and a buffer in use is never handed out. At most `keep` buffers are kept; beyond them (a
    consumer holding many batches) new ones are allocated and left to be freed.
    """

    def __init__(self, keep: int):
        self.keep, self._arrays, self._lock = keep, [], threading.Lock()
        probe = [np.empty(0, np.uint8)]
        self._unused = sys.getrefcount(probe[0])  # the count of an array only the list holds, read as below

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in a buffer nothing else uses."""
        need = math.prod(shape) * dtype.itemsize
        with self._lock:
            free = [i for i in range(len(self._arrays)) if sys.getrefcount(self._arrays[i]) == self._unused]
            fits = [i for i in free if self._arrays[i].nbytes >= need]
            if fits:
                array = self._arrays[min(fits, key=lambda i: self._arrays[i].nbytes)]
            else:
                # An eighth to spare, so that the next batches' lengths (spans differ by a few tokens) fit too.
                array = np.empty(need + need // 8, np.uint8)
                if free:  # too small for this batch: the larger one takes its place
                    self._arrays[free[0]] = array
                elif len(self._arrays) < self.keep:
                    self._arrays.append(array)
        return torch.from_numpy(array)[:need].view(dtype).view(shape)


class Prefetch:
    """Micro-batches of `micro` items each, all of `items`, built by `build(items)` on a thread of their own.

    Use it in a `with` block: leaving the block, however it is left, stops the thread, and the thread closes `items` (a
    reader's epoch, which then stops its own prefetch). An error raised by the reader or by build() is raised
    by next() in the loop, in its place in the order, as it was raised.
    """

    def __init__(self, items: Generator, build: Callable[[list], tuple], *, micro: int,
                 reader_state: Callable[[], dict], depth: int, max_bytes: int, pin: bool = False):
        self._ready: collections.deque = collections.deque()  # MicroBatch, then an exception or None (the end)
        self._bytes, self._stop, self._cond = 0, False, threading.Condition()
        self.depth, self.max_bytes = depth, max_bytes
        self._thread = threading.Thread(target=self._fill, args=(items, build, micro, reader_state, pin),
                                        daemon=True, name="batch-prefetch")
        self._thread.start()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> MicroBatch:
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._ready)
            got = self._ready[0]
            if got is None:  # the end: left in place, so that every later next() ends too
                raise StopIteration
            self._ready.popleft()
            if isinstance(got, BaseException):
                raise got
            self._bytes -= got.nbytes
            self._cond.notify_all()
        got.wait_s = time.perf_counter() - t0
        return got

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()

    def _fill(self, items: Generator, build, micro: int, reader_state, pin: bool) -> None:
        try:
            while group := list(itertools.islice(items, micro)):
                state = reader_state()  # read here, on the thread that advances the reader
                tensors = build(group)
                if pin:  # page-locked, so that the copy to the accelerator runs while the loop goes on
                    inputs, *rest = tensors
                    tensors = ({k: v.pin_memory() for k, v in inputs.items()}, *(x.pin_memory() for x in rest))
                if not self._put(MicroBatch(group, tensors, _nbytes(tensors, group), state)):
                    return
            self._put(None)
        except BaseException as e:  # raised by next() in the loop
            self._put(e)
        finally:
            items.close()

    def _put(self, got) -> bool:
        """Queue `got` once there is room for it; False when the loop has gone away."""
        size = got.nbytes if isinstance(got, MicroBatch) else 0
        with self._cond:
            self._cond.wait_for(lambda: self._stop or not self._ready or (
                len(self._ready) < self.depth and self._bytes + size <= self.max_bytes))
            if self._stop:
                return False
            self._ready.append(got)
            self._bytes += size
            self._cond.notify_all()
            return True


def epoch_batches(reader, epoch: int, done: int, s, micro: int, build, device, *, until: int | None = None) -> Prefetch:
    """The training loop's micro-batches of `epoch` from its global step `done` on, then of every later epoch
    before `until` (default: `epoch` alone), built ahead by `build` (batch_builder below) and pinned in memory for
    an accelerator (StudentConfig `s`). Across epochs the prefetch runs on: the next epoch's first batches are
    built while the loop trains on the last ones of this one, instead of the loop waiting for the pipeline to
    fill again at each epoch's start (BENCHMARKS.md, P6). The reader yields the rank's items of whole steps only,
    so every micro-batch is whole and belongs to one epoch."""
    def items():  # none when epoch = until: a resumed run whose last step is done
        for e in range(epoch, epoch + 1 if until is None else until):
            yield from reader.epoch(e, start=done * s.global_batch if e == epoch else 0)
    return Prefetch(items(), build, micro=micro, reader_state=reader.state_dict,
                    depth=s.prefetch, max_bytes=s.prefetch_mb * 2**20, pin=torch.device(device).type == "cuda")


# -- what a micro-batch holds, and how the prefetch thread builds one --------------------------------------------
def make_batch(lm, items, images, answer_starts: dict | None = None, device="cpu", empty=None):
    """Model inputs [BOS] + stored span, and the teacher targets aligned with them, position by position.

    Returns (inputs, target [b, t, l, d], span_mask [b, t]: positions with a target, ce_mask [b, t]:
    tokens L_gt is taken on — every real token, or from the answer on when answer_starts is given).
    The target keeps the items' dtype (the store's; an int8 store's values come in float32): `losses` takes it
    to float32, which gives the same values as a float32 target would, and the host builds and moves half the
    bytes of a 16-bit store. `empty(shape, dtype)` allocates it (default torch.empty; stages.batches.Buffers).
    """
    inputs = inputs_from_spans(lm, [it.token_ids.tolist() for it in items], images)
    b, t = inputs["input_ids"].shape
    dims = lm.dims
    target = (empty or _empty)((b, t, dims.n_layers, dims.d_model), items[0].hidden.dtype)
    span_mask = torch.zeros(b, t)
    ce_mask = inputs["attention_mask"].clone()
    for row, it in enumerate(items):
        n, keep = len(it.token_ids), torch.from_numpy(it.keep)  # keep: span tokens with a stored row
        # Each position is written once: zeros where no target is (a reused buffer holds anything there, and
        # a NaN times the span mask's 0 would still be NaN), the stored rows elsewhere.
        target[row, : t - n].zero_()
        if keep.all():  # one copy: no temporary (BENCHMARKS.md P6)
            target[row, t - n:].copy_(it.hidden)
        else:
            target[row, t - n:][~keep] = 0
            target[row, t - n:][keep] = it.hidden.to(target.dtype)
        span_mask[row, t - n:] = keep.float()
        ce_mask[row, : t - n] = 0  # L_gt predicts the span's tokens only, never BOS (from a pad position)
        if answer_starts:
            ce_mask[row, : t - n + answer_starts[it.sample_id]] = 0
    # The model may sit on an accelerator (DeepSpeed moves it there); the batch follows it.
    moved = [x.to(device) for x in (target, span_mask, ce_mask)]
    return {k: v.to(device) for k, v in inputs.items()}, *moved


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def batch_builder(lm, by_id: dict, answer_starts: dict, device="cpu", keep: int = 8):
    """build(items) for the loop's prefetch (stages/batches.py): the images decoded, then make_batch on the CPU.

    The targets go into memory whose pages are already there: for an accelerator page-locked memory from torch's
    cache of it (which hands a block out again only once the copies from it are done, and which the loop's
    asynchronous copy needs anyway), else buffers reused once nothing uses them (at most `keep` kept)."""
    if torch.device(device).type == "cuda":
        empty = lambda shape, dtype: torch.empty(shape, dtype=dtype, pin_memory=True)  # noqa: E731
    else:
        empty = Buffers(keep).empty
    return lambda items: make_batch(lm, items, [[by_id[it.sample_id].load_image()] for it in items], answer_starts,
                                    empty=empty)
