"""Reading a target store: every item in query order (read_items), or shuffled epochs for the
student (TargetReader) with background prefetch and an exact, checkpointable position."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from storage import layout
from storage._root import Root
from storage.errors import StoreError
from storage.layout import open_manifest  # noqa: F401  (public API: storage.reader.open_manifest)
from storage.manifest import Manifest
from storage.writer import Item


def read_items(url: str) -> Iterator[Item]:
    """Every published item, in query order (views of a query in order); unpublished shards and
    skipped queries are absent."""
    root = Root(url)
    manifest = layout.read_manifest(root)
    markers = _markers(root, manifest)
    for shard in sorted(markers):
        n_kept = len(layout.kept_queries(manifest, shard, markers[shard].skipped))
        pairs = [(j, v) for j in range(n_kept) for v in range(manifest.views)]
        yield from _load_items(root, manifest, markers[shard], pairs).values()


class TargetReader:
    """Shuffled epochs of a store for the student: one view per query per epoch (view = epoch % V).

    The order of an epoch is a function of (seed, epoch) and the set of published shards only:
    shards in a random order, the queries of each shard in a random order, then a shuffle buffer of
    `shuffle_buffer` items across shard boundaries. It is computed from indices, without reading
    data, so `epoch(e, start=n)` yields exactly what `epoch(e)` yields after its first n items.
    Shards are read by a background thread, up to `prefetch` shards ahead of the consumer.

    Checkpointing: save `state_dict()` with the student's checkpoint; after a restart,
    `load_state_dict(d)` and continue with `epoch(d["epoch"], start=d["step"])` (when step equals
    len(reader) that epoch is finished: go on with the next one).
    """

    def __init__(self, url: str, *, seed: int, shuffle_buffer: int = 64, prefetch: int = 2,
                 require_complete: bool = True):
        if seed < 0 or prefetch < 1 or shuffle_buffer < 0:
            raise ValueError(f"need seed >= 0, prefetch >= 1, shuffle_buffer >= 0; got {seed}, {prefetch}, {shuffle_buffer}")
        self.root = Root(url)
        self.manifest: Manifest = layout.read_manifest(self.root)
        self.seed, self.shuffle_buffer, self.prefetch = seed, shuffle_buffer, prefetch
        self._markers = _markers(self.root, self.manifest)
        missing = sorted(set(range(self.manifest.n_shards)) - set(self._markers))
        if require_complete and missing:
            raise StoreError(f"store {url} is incomplete: {len(missing)} of {self.manifest.n_shards} shards are not "
                             f"published ({_some(missing)}); rerun the teacher with the same configuration to fill them")
        # Items per epoch in each shard: its queries minus the skipped ones.
        self._n_kept = {s: len(layout.kept_queries(self.manifest, s, m.skipped)) for s, m in self._markers.items()}
        self._state = {"epoch": 0, "step": 0}

    def __len__(self) -> int:
        return sum(self._n_kept.values())

    def state_dict(self) -> dict:
        """Position after the last yielded item: step = items of `epoch` consumed so far."""
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

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Item]:
        """Items of `epoch` from position `start` on (start = items of this epoch already consumed)."""
        if epoch < 0 or not 0 <= start <= len(self):
            raise ValueError(f"need epoch >= 0 and 0 <= start <= {len(self)}; got epoch {epoch}, start {start}")
        tail = self.order(epoch)[start:]
        wanted: dict[int, list[int]] = {}  # shard -> kept indices needed, in order of first need
        for shard, j in tail:
            wanted.setdefault(shard, []).append(j)
        loaded: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        args = (list(wanted.items()), epoch % self.manifest.views, loaded, stop)
        threading.Thread(target=self._load_ahead, args=args, daemon=True, name="store-prefetch").start()
        pending: dict[tuple[int, int], Item] = {}
        try:
            for step, key in enumerate(tail, start + 1):
                while key not in pending:  # shards arrive in order of first need, so this ends
                    got = loaded.get()
                    if isinstance(got, BaseException):
                        raise got
                    pending.update(got)
                self._state = {"epoch": epoch, "step": step}
                yield pending.pop(key)
        finally:
            stop.set()

    def _load_ahead(self, wanted: list[tuple[int, list[int]]], view: int, loaded: queue.Queue, stop: threading.Event):
        try:
            for shard, js in wanted:
                items = _load_items(self.root, self.manifest, self._markers[shard], [(j, view) for j in js])
                got = {(shard, j): item for (j, _), item in items.items()}
                if not _put(loaded, got, stop):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            _put(loaded, e, stop)


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


def _load_items(root: Root, manifest: Manifest, marker: layout.Marker,
                pairs: list[tuple[int, int]]) -> dict[tuple[int, int], Item]:
    """Read one shard and cut out the items (kept query j, view) in `pairs`, in that order; copies,
    so that the shard's arrays can be freed while the items wait in the shuffle buffer."""
    try:
        arrays = layout.read_arrays(root, marker)
    except StoreError as e:
        raise StoreError(f"{root.url}: {e}; run `pipeline cache verify {root.url}`") from None
    if problems := layout.check_arrays(manifest, marker, arrays, checksums=False):
        raise StoreError(f"{problems[0]}; run `pipeline cache verify {root.url}`")
    hidden = _as_torch(arrays["hidden"], manifest.dtype)  # [K, L, d], K = kept tokens
    offsets, icd_offsets, keep = arrays["offsets"], arrays["icd_offsets"], arrays["keep"].astype(bool)
    rows = np.concatenate([[0], np.cumsum(keep)])  # token offset -> hidden row offset
    items = {}
    for j, view in pairs:
        i = j * manifest.views + view  # item index: query-major, view-minor
        a, b = int(offsets[i]), int(offsets[i + 1])
        ca, cb = int(icd_offsets[i]), int(icd_offsets[i + 1])
        items[j, view] = Item(sample_id=str(arrays["sample_ids"][i]), view=view,
                              token_ids=arrays["token_ids"][a:b].copy(), hidden=hidden[rows[a]:rows[b]].clone(),
                              icd_ids=tuple(str(c) for c in arrays["icd_ids"][ca:cb]), keep=keep[a:b].copy())
    return items


def _as_torch(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a torch tensor of the manifest dtype (bfloat16 from its uint16 bits)."""
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
