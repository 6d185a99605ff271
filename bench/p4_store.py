"""P4 store I/O: writing and reading shards through the store (open_for_write/write_shard, TargetReader)
against a plain sequential write (+ fsync) and read of the same bytes, in files on the same disk; the
bytes each data-parallel rank reads per epoch; and what lossless compression of bfloat16 would give.

Both sides are measured cold: after each write, the files are fsynced and dropped from the page cache
(posix_fadvise DONTNEED: no root here to drop the whole cache), so the reads come from the disk; each
timed step starts on a settled disk (a pause first), and store and plain alternate going first. The
payload is the bytes of the shard arrays; MB/s is that payload over wall time. Bytes per value = bytes
on disk of the whole store / stored values. Bytes read per rank: read_bytes of /proc/self/io (what the
kernel fetched from the disk for this process, read-ahead included) around one epoch of
TargetReader(rank=r, world_size=W), each rank in turn after evicting the store from the page cache.

    .venv/bin/python -m bench.p4_store [--reps 5] [--items 64] [--shards 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch

from bench.common import HIDDEN, LAYERS, Timer, emit, loadavg, set_threads, stats, work_dpath


def _evict(dpath: str) -> None:
    for d, _, names in os.walk(dpath):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# A shard as real runs write it (Idefics2-8b: 32 layers of 4096; 16 queries of ~84 span tokens: 64
# image tokens and the text), ~15x P4's toy shard: the per-shard fixed cost weighs accordingly less.
REAL = {"layers": 32, "hidden": 4096, "tokens": (74, 94)}


def _items(n_shards: int, n_items: int, dtype: torch.dtype, seed: int = 0, layers: int = LAYERS, hidden: int = HIDDEN,
           tokens: tuple[int, int] = (30, 60)):
    from storage.writer import Item
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(n_shards):
        items = []
        for i in range(n_items):
            t = int(rng.integers(*tokens))  # span tokens of a VQA query + answer
            items.append(Item(f"q{s * n_items + i:06d}", 0, rng.integers(7, 400, t).astype(np.int32),
                              torch.randn(t, layers, hidden, generator=g).to(dtype), ("a", "b", "c", "d")))
        shards.append(items)
    return shards


def _raw_payload(items) -> list[bytes]:
    """The bytes a shard holds, as one buffer per array (what a plain writer would write)."""
    from storage.writer import _stored_values
    return [np.concatenate([_stored_values(it.hidden, str(it.hidden.dtype).removeprefix("torch."), "") for it in items]).tobytes(),
            np.concatenate([it.token_ids for it in items]).tobytes()]


def one_dtype(dtype: str, reps: int, n_items: int, n_shards: int, width: dict | None = None) -> dict:
    from storage.manifest import FORMAT_VERSION, Manifest
    from storage.reader import TargetReader
    from storage.writer import open_for_write
    width = width or {"layers": LAYERS, "hidden": HIDDEN}
    shards = _items(n_shards, n_items, getattr(torch, dtype), **width)
    query_ids = tuple(it.sample_id for items in shards for it in items)
    manifest = Manifest(FORMAT_VERSION, {"bench": "p4"}, query_ids, 1, n_items, width["layers"], width["hidden"], dtype)
    raw = [_raw_payload(items) for items in shards]
    payload = sum(len(b) for bufs in raw for b in bufs)
    n_values = sum(it.hidden.numel() for items in shards for it in items)
    root = os.path.join(work_dpath(), "p4")
    w_store, w_raw, r_store, r_raw, disk = [], [], [], [], []
    for r in range(reps):
        store, plain = os.path.join(root, f"store-{dtype}"), os.path.join(root, f"raw-{dtype}")
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(plain, ignore_errors=True)
        os.makedirs(plain)
        def write_store():  # pack, checksum, write, fsync, publish
            writer = open_for_write(store, manifest)
            for s, items in enumerate(shards):
                writer.write_shard(s, items)

        def write_plain():  # one file per array per shard, written and fsynced
            for s, bufs in enumerate(raw):
                for j, buf in enumerate(bufs):
                    with open(os.path.join(plain, f"{s}-{j}.bin"), "wb") as f:
                        f.write(buf)
                        f.flush()
                        os.fsync(f.fileno())
            fd = os.open(plain, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        def read_store():  # the student's read path: every item of an epoch, as torch tensors
            assert sum(1 for _ in TargetReader(store, seed=0, shuffle_buffer=64).epoch(0)) == len(query_ids)

        def read_plain():
            for s, bufs in enumerate(raw):
                for j in range(len(bufs)):
                    with open(os.path.join(plain, f"{s}-{j}.bin"), "rb") as f:
                        np.frombuffer(f.read(), dtype=np.uint8)
        # This virtual disk acknowledges an fsync before the host has written the data, and the next
        # write then waits for the host: at real width whichever of the two writes went second took
        # 2.5-3.5 s, the first 0.6-0.8 s, store or plain alike. So each timed step starts on a settled
        # disk (a pause of payload / 200 MB/s), and the order alternates.
        (a, b), (c, d) = (Timer(), Timer()), (Timer(), Timer())
        for timer, step in ((a, write_store), (b, write_plain))[::1 if r % 2 == 0 else -1]:
            time.sleep(0.2 + payload / 200e6)
            with timer:
                step()
        _evict(store)
        _evict(plain)
        for timer, step in ((c, read_store), (d, read_plain))[::1 if r % 2 == 0 else -1]:
            time.sleep(0.2 + payload / 200e6)
            with timer:
                step()
        w_store.append(a.s), w_raw.append(b.s), r_store.append(c.s), r_raw.append(d.s)
        from storage._root import Root
        disk.append(Root(store).size())
    mb = payload / 1e6
    mbs = lambda ts: mb / stats(ts)["median"]  # noqa: E731
    return {"dtype": dtype, "layers": width["layers"], "d_model": width["hidden"], "items_per_shard": n_items,
            "shard_mb": mb / n_shards, "payload_mb": mb, "values": n_values, "write_store_s": stats(w_store),
            "write_raw_s": stats(w_raw), "read_store_s": stats(r_store), "read_raw_s": stats(r_raw),
            "write_store_mb_s": mbs(w_store), "write_raw_mb_s": mbs(w_raw),
            "read_store_mb_s": mbs(r_store), "read_raw_mb_s": mbs(r_raw),
            "write_fraction_of_raw": stats(w_raw)["median"] / stats(w_store)["median"],
            "read_fraction_of_raw": stats(r_raw)["median"] / stats(r_store)["median"],
            # each pair measured back to back: steadier than the ratio of medians while the disk's speed drifts
            "write_paired": stats([p / q for p, q in zip(w_raw, w_store)]),
            "read_paired": stats([p / q for p, q in zip(r_raw, r_store)]),
            "bytes_on_disk": disk[-1], "bytes_per_value": disk[-1] / n_values}


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def per_rank_bytes(reps: int, n_items: int, n_shards: int, batch: int = 8) -> dict:
    """Bytes each rank reads from the disk in one epoch, at 1 and 2 ranks, against store bytes / world size."""
    from storage._root import Root
    from storage.manifest import FORMAT_VERSION, Manifest
    from storage.reader import TargetReader
    from storage.writer import open_for_write
    shards = _items(n_shards, n_items, torch.bfloat16, seed=1)
    query_ids = tuple(it.sample_id for items in shards for it in items)
    store = os.path.join(work_dpath(), "p4", "store-ranks")
    shutil.rmtree(store, ignore_errors=True)
    writer = open_for_write(store, Manifest(FORMAT_VERSION, {"bench": "p4-ranks"}, query_ids, 1, n_items, LAYERS, HIDDEN,
                                            "bfloat16"))
    for s, items in enumerate(shards):
        writer.write_shard(s, items)
    store_bytes = Root(store).size()
    hidden_bytes = {it.sample_id: it.hidden.numel() * 2 for items in shards for it in items}
    rows = []
    for world in (1, 2):
        per, own = {r: [] for r in range(world)}, {}
        for _ in range(reps):
            for rank in range(world):
                _evict(store)
                before = _read_bytes()
                got = [it.sample_id for it in TargetReader(store, seed=0, rank=rank, world_size=world, batch=batch).epoch(0)]
                per[rank].append(_read_bytes() - before)
                assert len(got) == len(query_ids) // world
                own[rank] = sum(hidden_bytes[q] for q in got)  # the `hidden` bytes of the items it trained on
        worst = max(stats(v)["median"] for v in per.values())
        rows.append({"world": world, "bytes_per_rank": {r: stats(v) for r, v in per.items()},
                     "own_hidden_bytes": own, "read_over_own": {r: stats(v)["median"] / own[r] for r, v in per.items()},
                     "worst_rank_bytes": worst, "fraction_of_share": worst / (store_bytes / world)})
    return {"store_bytes": store_bytes, "batch": batch, "items": len(query_ids), "rows": rows}


def compression(reps: int, n_items: int) -> list[dict]:
    """bfloat16 `hidden` of one P4 shard through zarr codecs, one chunk, one thread: bytes and MB/s of a
    write (encode, write, fsync) and a cold read (read, decode), against the same array uncompressed."""
    import numcodecs
    import zarr
    from zarr.codecs import BloscCodec
    from storage.writer import _stored_values
    numcodecs.blosc.set_nthreads(1)
    values = np.concatenate([_stored_values(it.hidden, "bfloat16", "") for it in _items(1, n_items, torch.bfloat16)[0]])
    codecs = {"none": None, "shuffle+lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),
              "shuffle+zstd-1": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2),
              "shuffle+zstd-3": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)}
    out = []
    for name, codec in codecs.items():
        w, r, size = [], [], 0
        for _ in range(reps):
            path = os.path.join(work_dpath(), "p4", f"codec-{name}")
            shutil.rmtree(path, ignore_errors=True)
            with Timer() as a:
                arr = zarr.create_array(path, shape=values.shape, chunks=values.shape, dtype=values.dtype,
                                        compressors=codec, fill_value=0)
                arr[...] = values
                _evict(path)  # fsyncs, then drops the pages
            with Timer() as b:
                back = zarr.open_array(path, mode="r")[...]
            assert np.array_equal(back, values)
            w.append(a.s), r.append(b.s)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        mb = values.nbytes / 1e6
        out.append({"codec": name, "ratio": values.nbytes / size, "write_mb_s": mb / stats(w)["median"],
                    "read_mb_s": mb / stats(r)["median"], "write_s": stats(w), "read_s": stats(r)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    ap.add_argument("--real-items", type=int, default=16, help="queries per shard of the real-width bfloat16 row; 0: none")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    rows = [one_dtype(d, args.reps, args.items, args.shards) for d in args.dtypes]
    if args.real_items:
        rows.append(one_dtype("bfloat16", args.reps, args.real_items, args.shards, REAL))
    emit("p4", {"items_per_shard": args.items, "shards": args.shards, "layers": LAYERS, "d_model": HIDDEN,
                "rows": rows, "ranks": per_rank_bytes(args.reps, args.items, args.shards),
                "compression": compression(args.reps, args.items), "loadavg": loadavg()})


if __name__ == "__main__":
    main()
