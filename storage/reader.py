"""Reading a target store: every item in query order (read_items), or shuffled epochs for the
student (TargetReader): each rank reads only its own items' bytes, with background prefetch and an
exact, checkpointable position."""
from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from storage import layout
from storage._root import Root
from storage.errors import StoreError
from storage.layout import open_manifest  # noqa: F401  (public API: storage.reader.open_manifest)
from storage.manifest import Manifest
from storage.writer import Item, Logits

READERS = 8  # item reads in flight per reader (BENCHMARKS.md, P4 cold read)


def read_items(url: str, shards=None) -> Iterator[Item]:
    """Every published item (of the given shards only, if given), in query order (views of a query in
    order); unpublished shards and skipped queries are absent. Each shard's `hidden` is read in one piece."""
    root = Root(url)
    manifest = layout.read_manifest(root)
    markers = _markers(root, manifest)
    for shard in sorted(markers if shards is None else set(shards) & set(markers)):
        meta = _Shard(root, manifest, markers[shard])
        hidden = _as_torch(layout.read_rows(root, manifest, markers[shard], 0, int(meta.rows[-1])), manifest.dtype)
        for i in range(len(meta.sample_ids)):
            lo, hi = meta.rows_of(i)
            yield meta.item(i, hidden[lo:hi].clone(), meta.read_logits(root, markers[shard], i))  # a copy: the shard is freed


class TargetReader:
    """Shuffled epochs of a store for the student: one view per query per epoch (view = epoch % V).

    The order of an epoch is a function of (seed, epoch) and the set of published shards only:
    shards in a random order, the queries of each shard in a random order, then a shuffle buffer of
    `shuffle_buffer` items across shard boundaries. It is computed from indices, without reading
    data, so `epoch(e, start=n)` yields exactly what `epoch(e)` yields after its first n items.

    Data parallel: global step g trains on items [g*batch, (g+1)*batch) of that order, whatever the
    world size, and rank r of world_size takes the r-th of world_size equal parts of each step. A
    reader yields its own rank's items only and reads only their bytes (one byte range of `hidden`
    per item, and the small arrays of the shards they are in); items past the last whole step are
    not read. Items are read by a background thread, up to `prefetch` items ahead of the consumer.

    Checkpointing: save `state_dict()` with the student's checkpoint; after a restart,
    `load_state_dict(d)` and continue with `epoch(d["epoch"], start=d["step"])` (when step equals
    the items of the epoch's whole steps that epoch is finished: go on with the next one).

    queries=N reads the items of the store's first N queries only (student.num_queries): the epochs, their
    length, resume and the data-parallel split are those of a store that held just them.
    """

    def __init__(self, url: str, *, seed: int, shuffle_buffer: int = 64, prefetch: int = 16,
                 require_complete: bool = True, rank: int = 0, world_size: int = 1, batch: int = 1,
                 queries: int | None = None):
        if seed < 0 or prefetch < 1 or shuffle_buffer < 0:
            raise ValueError(f"need seed >= 0, prefetch >= 1, shuffle_buffer >= 0; got {seed}, {prefetch}, {shuffle_buffer}")
        if not 0 <= rank < world_size or batch < 1 or batch % world_size:
            raise ValueError(f"need 0 <= rank < world_size and a batch that world_size divides; "
                             f"got rank {rank}, world_size {world_size}, batch {batch}")
        self.root = Root(url)
        self.manifest: Manifest = layout.read_manifest(self.root)
        self.seed, self.shuffle_buffer, self.prefetch = seed, shuffle_buffer, prefetch
        self.rank, self.world_size, self.batch = rank, world_size, batch
        self._markers = _markers(self.root, self.manifest)
        missing = sorted(set(range(self.manifest.n_shards)) - set(self._markers))
        if require_complete and missing:
            raise StoreError(f"store {url} is incomplete: {len(missing)} of {self.manifest.n_shards} shards are not "
                             f"published ({_some(missing)}); rerun the teacher with the same configuration to fill them")
        if queries is not None and not 1 <= queries <= self.manifest.n_queries:
            raise ValueError(f"need 1 <= queries <= {self.manifest.n_queries} (the store's queries), got {queries}")
        # Items per epoch in each shard: its queries minus the skipped ones, of the first `queries` only. A shard's
        # kept queries are in query order, so those among the first N are its first ones: order() indexes them as is.
        first = set(self.manifest.query_ids[:queries])
        self._n_kept = {s: sum(q in first for q in layout.kept_queries(self.manifest, s, m.skipped))
                        for s, m in self._markers.items()}
        self._state = {"epoch": 0, "step": 0}

    def __len__(self) -> int:
        """Items per epoch in the whole store (all ranks together)."""
        return sum(self._n_kept.values())

    def state_dict(self) -> dict:
        """Position after the last yielded item: step = items of `epoch` consumed so far by all ranks
        (at the end of this rank's part of a global step: the end of that step)."""
        return {**self._state, "seed": self.seed, "fingerprint": self.manifest.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise StoreError(f"reader position was saved with seed {state['seed']}, this reader has seed {self.seed}; "
                             "resume with the original seed")
        if state.get("fingerprint", self.manifest.fingerprint) != self.manifest.fingerprint:
            raise StoreError(f"reader position was saved for another store (fingerprint {state['fingerprint'][:12]}...) "
                             f"than {self.root.url}; resume with the original store")
        self._state = {"epoch": int(state["epoch"]), "step": int(state["step"])}

    def order(self, epoch: int) -> list[tuple[int, int]]:
        """The epoch's items as (shard, index among the shard's kept queries); no data is read."""
        rng = np.random.default_rng([self.seed, epoch])
        shards = sorted(self._n_kept)
        stream = [(shards[i], int(j)) for i in rng.permutation(len(shards)) for j in rng.permutation(self._n_kept[shards[i]])]
        return _buffer_shuffle(stream, self.shuffle_buffer, rng)

    def positions(self, start: int = 0) -> list[int]:
        """Positions in an epoch's order, from `start` on, of the items this rank trains on."""
        part = self.batch // self.world_size
        return [p for p in range(start, len(self) - len(self) % self.batch) if (p % self.batch) // part == self.rank]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Item]:
        """This rank's items of `epoch` from position `start` on (start = items of this epoch already
        consumed by all ranks; with several ranks, a whole number of global steps)."""
        if epoch < 0 or not 0 <= start <= len(self) or (self.world_size > 1 and start % self.batch):
            raise ValueError(f"need epoch >= 0 and 0 <= start <= {len(self)}, start a multiple of the batch "
                             f"{self.batch} with several ranks; got epoch {epoch}, start {start}")
        order, part = self.order(epoch), self.batch // self.world_size
        mine = self.positions(start)
        loaded: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        args = ([order[p] for p in mine], epoch % self.manifest.views, loaded, stop)
        threading.Thread(target=self._load_ahead, args=args, daemon=True, name="store-prefetch").start()
        try:
            for p in mine:
                got = loaded.get()
                if isinstance(got, BaseException):
                    raise got
                end_of_part = (p % self.batch) % part == part - 1
                self._state = {"epoch": epoch, "step": (p // self.batch + 1) * self.batch if end_of_part else p + 1}
                yield got
        finally:
            stop.set()

    def _load_ahead(self, wanted: list[tuple[int, int]], view: int, loaded: queue.Queue, stop: threading.Event):
        """Read the items `wanted` (shard, kept index) and queue them in order. A shard's small arrays are
        read at its first item and dropped after its last, so each is read once per epoch. The items'
        rows are read READERS at a time: a disk (or an object store) serves several requests at once
        faster than one after the other, and an item is one request."""
        try:
            last = {shard: n for n, (shard, _) in enumerate(wanted)}
            open_shards: dict[int, _Shard] = {}
            reading: collections.deque = collections.deque()  # (shard's arrays, item index, rows being read)
            with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="store-read") as pool:
                for n, (shard, j) in enumerate(wanted):
                    marker = self._markers[shard]
                    if shard not in open_shards:
                        open_shards[shard] = _Shard(self.root, self.manifest, marker)
                    meta = open_shards[shard]
                    i = j * self.manifest.views + view  # item index: query-major, view-minor
                    reading.append((meta, i, pool.submit(layout.read_rows, self.root, self.manifest, marker, *meta.rows_of(i)),
                                    pool.submit(meta.read_logits, self.root, marker, i)))
                    if last[shard] == n:
                        del open_shards[shard]
                    if len(reading) >= READERS and not self._hand_over(reading.popleft(), loaded, stop):
                        return
                while reading:
                    if not self._hand_over(reading.popleft(), loaded, stop):
                        return
        except BaseException as e:  # handed to the consumer, which raises it
            _put(loaded, e, stop)

    def _hand_over(self, reading, loaded: queue.Queue, stop: threading.Event) -> bool:
        meta, i, rows, logits = reading
        return _put(loaded, meta.item(i, _as_torch(rows.result(), self.manifest.dtype), logits.result()), stop)


def _put(q: queue.Queue, value, stop: threading.Event) -> bool:
    """Put unless the consumer has gone away (then stop is set and nobody will take it)."""
    while not stop.is_set():
        try:
            q.put(value, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _markers(root: Root, manifest: Manifest) -> dict[int, layout.Marker]:
    markers, problems = layout.load_markers(root, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `pipeline cache verify {root.url}`)" if len(problems) > 1 else ""
        raise StoreError(problems[0] + more)
    return markers


class _Shard:
    """A shard's arrays but `hidden` (a few bytes per token), checked against the manifest and marker."""

    def __init__(self, root: Root, manifest: Manifest, marker: layout.Marker):
        try:
            arrays = layout.read_meta(root, manifest, marker)
        except StoreError as e:
            raise StoreError(f"{root.url}: {e}; run `pipeline cache verify {root.url}`") from None
        if problems := layout.check_arrays(manifest, marker, arrays, checksums=False):
            raise StoreError(f"{problems[0]}; run `pipeline cache verify {root.url}`")
        self.views, self.manifest = manifest.views, manifest
        self.logit_offsets = arrays.get("logit_offsets")  # with teacher logits: their rows per item, positions, lse
        if self.logit_offsets is not None:
            self.logit_pos, self.logit_lse, self.logit_width = arrays["logit_pos"], arrays["logit_lse"], arrays["logits"].shape[1]
        self.offsets, self.icd_offsets, self.keep = arrays["offsets"], arrays["icd_offsets"], arrays["keep"].astype(bool)
        self.token_ids, self.sample_ids, self.icd_ids = arrays["token_ids"], arrays["sample_ids"], arrays["icd_ids"]
        self.rows = np.concatenate([[0], np.cumsum(self.keep)])  # token offset -> hidden row offset

    def rows_of(self, i: int) -> tuple[int, int]:
        """The rows of `hidden` that item i owns."""
        return int(self.rows[self.offsets[i]]), int(self.rows[self.offsets[i + 1]])

    def read_logits(self, root: Root, marker: layout.Marker, i: int) -> Logits | None:
        """Item i's teacher logits (one byte range of `logits` and of `logit_ids`), or None for a store without."""
        if self.logit_offsets is None:
            return None
        lo, hi = int(self.logit_offsets[i]), int(self.logit_offsets[i + 1])
        ids, values = layout.read_logit_rows(root, self.manifest, marker, lo, hi, self.logit_width)
        return Logits(pos=self.logit_pos[lo:hi].copy(), values=_as_torch(values, self.manifest.dtype),
                      lse=self.logit_lse[lo:hi].copy(), ids=None if ids is None else ids.copy())

    def item(self, i: int, hidden: torch.Tensor, logits: Logits | None = None) -> Item:
        """Item i with its rows of `hidden` ([kept t, L, d]); copies, so the shard's arrays can be freed."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ca, cb = int(self.icd_offsets[i]), int(self.icd_offsets[i + 1])
        return Item(sample_id=str(self.sample_ids[i]), view=i % self.views, token_ids=self.token_ids[a:b].copy(),
                    hidden=hidden, icd_ids=tuple(str(c) for c in self.icd_ids[ca:cb]), keep=self.keep[a:b].copy(),
                    logits=logits)


def _as_torch(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a torch tensor of the manifest dtype (bfloat16 from its uint16 bits; an int8 store's
    values come dequantized, in float32, from layout.read_rows)."""
    values = values.astype(values.dtype.newbyteorder("="), copy=False)
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def _buffer_shuffle(stream: list, size: int, rng: np.random.Generator) -> list:
    """The order a streaming shuffle buffer of `size` slots gives: fill, then for each new element
    emit a random slot and put the element there; finally emit the rest in random order."""
    if size <= 1:
        return stream
    out, buf = [], stream[:size]
    for x, slot in zip(stream[size:], rng.integers(0, size, size=max(0, len(stream) - size))):
        out.append(buf[slot])
        buf[slot] = x
    return out + [buf[i] for i in rng.permutation(len(buf))]


def _some(values: list[int], n: int = 10) -> str:
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")
