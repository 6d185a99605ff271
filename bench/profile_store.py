"""The profile behind P4 (and P1's write share): cProfile of write_shard and of one TargetReader epoch on
the P4 shards (float16), reduced to the few lines that explain where the time goes.

    .venv/bin/python -m bench.profile_store
"""
from __future__ import annotations

import cProfile
import os
import pstats
import shutil

import torch

from bench.common import HIDDEN, LAYERS, emit, set_threads, work_dpath
from bench.p4_store import _evict, _items

WATCH = {"write": ("posix.fsync", "checksum", "write_arrays", "zlib.crc32", "_shard_arrays", "create", "concatenate"),
         "read": ("read_meta", "acquire", "check_arrays", "item", "_as_torch", "_load_ahead")}


def _top(pr: cProfile.Profile, names: tuple[str, ...]) -> dict:
    st = pstats.Stats(pr)
    out = {}
    for (fname, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        key = func.strip("<>").replace("built-in method ", "").replace("method '", "").split("'")[0]
        for n in names:
            if n == key or key.endswith(n):
                prev = out.get(n, {"calls": 0, "cum_s": 0.0})
                out[n] = {"calls": prev["calls"] + nc, "cum_s": max(prev["cum_s"], ct) if n != "posix.fsync" else prev["cum_s"] + ct}
    out["total_s"] = max(v[3] for v in st.stats.values())
    return out


def main():
    set_threads(1)
    from storage.manifest import FORMAT_VERSION, Manifest
    from storage.reader import TargetReader
    from storage.writer import open_for_write
    shards = _items(2, 64, torch.float16)
    q = tuple(it.sample_id for s in shards for it in s)
    m = Manifest(FORMAT_VERSION, {"bench": "profile"}, q, 1, 64, LAYERS, HIDDEN, "float16")
    store = os.path.join(work_dpath(), "profile-store")
    shutil.rmtree(store, ignore_errors=True)
    pr = cProfile.Profile()
    pr.enable()
    w = open_for_write(store, m)
    for i, s in enumerate(shards):
        w.write_shard(i, s)
    pr.disable()
    write = _top(pr, WATCH["write"])
    n_files = sum(len(f) for _, _, f in os.walk(store))
    n_dirs = sum(len(d) for _, d, _ in os.walk(store))
    _evict(store)
    pr = cProfile.Profile()
    pr.enable()
    reader = TargetReader(store, seed=0)
    for _ in reader.epoch(0):
        pass
    pr.disable()
    read_consumer = _top(pr, WATCH["read"])
    # The reader's work happens in its prefetch thread; profile that thread's function in this one.
    import queue
    import threading
    _evict(store)
    pr = cProfile.Profile()
    pr.enable()
    order = reader.order(0)
    reader._load_ahead([order[p] for p in reader.positions()], 0, queue.Queue(), threading.Event())
    pr.disable()
    emit("profile_store", {"write": write, "files": n_files, "dirs": n_dirs, "read_consumer": read_consumer,
                           "read_load_items": _top(pr, WATCH["read"])})


if __name__ == "__main__":
    main()
