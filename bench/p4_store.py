"""P4 store I/O: writing and reading shards through the store (open_for_write/write_shard, TargetReader)
against a plain sequential write (+ fsync) and read of the same bytes, in files on the same disk.

Both sides are measured cold: after each write, the files are fsynced and dropped from the page cache
(posix_fadvise DONTNEED), so the reads come from the disk. The payload is the bytes of the shard arrays;
MB/s is that payload over wall time. Bytes per value = bytes on disk of the whole store / stored values.

    .venv/bin/python -m bench.p4_store [--reps 5] [--items 64] [--shards 2]
"""
from __future__ import annotations

import argparse
import os
import shutil

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


def _items(n_shards: int, n_items: int, dtype: torch.dtype, seed: int = 0):
    from storage.writer import Item
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(n_shards):
        items = []
        for i in range(n_items):
            t = int(rng.integers(30, 60))  # span tokens of a VQA query + answer
            items.append(Item(f"q{s * n_items + i:06d}", 0, rng.integers(7, 400, t).astype(np.int32),
                              torch.randn(t, LAYERS, HIDDEN, generator=g).to(dtype), ("a", "b", "c", "d")))
        shards.append(items)
    return shards


def _raw_payload(items) -> list[bytes]:
    """The bytes a shard holds, as one buffer per array (what a plain writer would write)."""
    from storage.writer import _stored_values
    return [np.concatenate([_stored_values(it.hidden, str(it.hidden.dtype).removeprefix("torch."), "") for it in items]).tobytes(),
            np.concatenate([it.token_ids for it in items]).tobytes()]


def one_dtype(dtype: str, reps: int, n_items: int, n_shards: int) -> dict:
    from storage.manifest import FORMAT_VERSION, Manifest
    from storage.reader import TargetReader
    from storage.writer import open_for_write
    shards = _items(n_shards, n_items, getattr(torch, dtype))
    query_ids = tuple(it.sample_id for items in shards for it in items)
    manifest = Manifest(FORMAT_VERSION, {"bench": "p4"}, query_ids, 1, n_items, LAYERS, HIDDEN, dtype)
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
        with Timer() as a:  # the store: pack, checksum, zarr write, fsync, publish
            writer = open_for_write(store, manifest)
            for s, items in enumerate(shards):
                writer.write_shard(s, items)
        with Timer() as b:  # plain: one file per array per shard, written and fsynced
            for s, bufs in enumerate(raw):
                for j, buf in enumerate(bufs):
                    with open(os.path.join(plain, f"{s}-{j}.bin"), "wb") as f:
                        f.write(buf)
                        f.flush()
                        os.fsync(f.fileno())
            fd = os.open(plain, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        _evict(store)
        _evict(plain)
        with Timer() as c:  # the student's read path: every item of an epoch, as torch tensors
            reader = TargetReader(store, seed=0, shuffle_buffer=64)
            n = sum(1 for _ in reader.epoch(0))
        assert n == len(query_ids)
        with Timer() as d:
            for s, bufs in enumerate(raw):
                for j in range(len(bufs)):
                    with open(os.path.join(plain, f"{s}-{j}.bin"), "rb") as f:
                        np.frombuffer(f.read(), dtype=np.uint8)
        w_store.append(a.s), w_raw.append(b.s), r_store.append(c.s), r_raw.append(d.s)
        from storage._root import Root
        disk.append(Root(store).size())
    mb = payload / 1e6
    mbs = lambda ts: mb / stats(ts)["median"]  # noqa: E731
    return {"dtype": dtype, "payload_mb": mb, "values": n_values, "write_store_s": stats(w_store),
            "write_raw_s": stats(w_raw), "read_store_s": stats(r_store), "read_raw_s": stats(r_raw),
            "write_store_mb_s": mbs(w_store), "write_raw_mb_s": mbs(w_raw),
            "read_store_mb_s": mbs(r_store), "read_raw_mb_s": mbs(r_raw),
            "write_fraction_of_raw": stats(w_raw)["median"] / stats(w_store)["median"],
            "read_fraction_of_raw": stats(r_raw)["median"] / stats(r_store)["median"],
            "bytes_on_disk": disk[-1], "bytes_per_value": disk[-1] / n_values}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    rows = [one_dtype(d, args.reps, args.items, args.shards) for d in args.dtypes]
    emit("p4", {"items_per_shard": args.items, "shards": args.shards, "layers": LAYERS, "d_model": HIDDEN,
                "rows": rows, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
