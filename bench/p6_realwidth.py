"""P6 the student's data path at real width (issue 19): a synthetic store with Idefics2-8b-base's shapes (32
layers × 4096, bfloat16, spans of 80-90 tokens, COCO-sized JPEGs), written through the store's own writer, read
by 1 and by 2 ranks at once (2 ranks = two processes, each a TargetReader with its rank and world size).

- read: one epoch of each rank's TargetReader (global batch 4), items/s and GB/s of its items' `hidden` bytes,
  against a plain sequential read of the same chunk files by as many processes (each its share of the bytes), and
  against the same read with O_DIRECT (the disk's rate with almost no CPU: what the disk gives).
- data wait: the student's own data path (stages.batches.epoch_batches with stages.batches.batch_builder:
  targets read, JPEGs decoded and preprocessed by Idefics2's image processor, micro-batches built and moved
  to the device) driven by a loop whose compute is a time.sleep of 40 or 100 ms per step (no model runs), for
  --epochs epochs through one prefetch, as the stage runs them (it goes on into the next epoch while the loop
  trains on the last batches of this one). The run starts cold, so the first epoch reads the disk, and the later
  ones read what the page cache kept of it: all of this store, as on a node whose memory holds the store (an
  eviction between epochs, tried, stalls the other rank's reads and measures the eviction). Per step: data
  wait = the step's wall time − the time slept, i.e. everything between two steps that is not compute; also
  the loop's own `data_wait_s` (what losses.jsonl logs), and the CPU time the data path took per item (the
  rank's process time: the loop itself sleeps). Once more at the longest step with the store in the
  page cache ("warm"): the data path's own cost, without the disk.

Every measurement is cold: before it, the store and plain files are fsynced and dropped from the page cache
(posix_fadvise DONTNEED, as P4; no global drop_caches, which would evict other jobs' files too). The store is
deleted at the end unless --keep.

    .venv/bin/python -m bench.p6_realwidth [--gb 2.2] [--reps 4] [--epochs 3] [--keep]
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import shutil
import subprocess
import time
import traceback
from types import SimpleNamespace

import numpy as np

from bench.common import Timer, emit, loadavg, set_threads, stats, work_dpath

LAYERS, WIDTH, TOKENS = 32, 4096, (80, 91)  # Idefics2-8b-base; spans of 80-90 tokens (64 of them the image's)
GLOBAL_BATCH, MICRO_BATCH, SHARD_SIZE = 4, 2, 16  # the student's defaults; 16 queries per shard as P4's real row
ROW_BYTES = LAYERS * WIDTH * 2


def bench_lm():
    """What the student's data path needs of a loaded model, at Idefics2-8b-base's size: its dims, the tokenizer's
    BOS, and Idefics2's processor as the 8b checkpoint sets it (980/378 px edges, no splitting, 64 image tokens)."""
    import torch
    from transformers import Idefics2ImageProcessorPil, Idefics2Processor

    from stages.models import idefics2
    from stages.models.common import Dims
    from stages.models.tiny import build_tokenizer
    tok = build_tokenizer()
    processor = Idefics2Processor(image_processor=Idefics2ImageProcessorPil(do_image_splitting=False), tokenizer=tok,
                                  image_seq_len=64)
    idefics2.prepare_processor(processor)
    return SimpleNamespace(tokenizer=tok, adapter=idefics2, processor=processor, model=torch.nn.Module(),  # no weights
                           dims=Dims(n_layers=LAYERS, n_heads=32, n_kv_heads=8, head_dim=128, d_model=WIDTH))


def write_inputs(root: str, gb: float, seed: int = 0) -> dict:
    """The store (through storage.writer) and one JPEG per query; returns what the measurements need."""
    import torch
    from PIL import Image

    from storage.manifest import FORMAT_VERSION, Manifest
    from storage.writer import Item, open_for_write
    n = max(GLOBAL_BATCH * 2, round(gb * 1e9 / (sum(TOKENS) / 2 * ROW_BYTES)))
    query_ids = tuple(f"q{i:05d}" for i in range(n))
    store, images = os.path.join(root, "store"), os.path.join(root, "images")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(images)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for q in query_ids:  # COCO-like: 640 x 480 either way, smooth content with noise (~100 kB as JPEG)
        h, w = (480, 640) if rng.random() < 0.7 else (640, 480)
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, f"{q}.jpg"), quality=90)
    writer = open_for_write(store, Manifest(FORMAT_VERSION, {"bench": "p6"}, query_ids, 1, SHARD_SIZE, LAYERS, WIDTH,
                                            "bfloat16"))
    with Timer() as tm:
        for s in range(-(-n // SHARD_SIZE)):
            items = []
            for q in query_ids[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]:
                t = int(rng.integers(*TOKENS))
                items.append(Item(q, 0, rng.integers(7, 400, t).astype(np.int32),
                                  torch.randn(t, LAYERS, WIDTH, generator=g).to(torch.bfloat16), ("d0", "d1")))
            writer.write_shard(s, items)
    chunks = sorted(os.path.join(d, "0.0.0") for d, _, names in os.walk(store) if d.endswith("hidden") and "0.0.0" in names)
    return {"store": store, "images": images, "queries": n, "chunks": chunks, "write_s": tm.s,
            "store_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs),
            "hidden_bytes": sum(os.path.getsize(c) for c in chunks)}


# -- what each process (a rank) runs ---------------------------------------------------------------
def plain_read(inputs: dict, rank: int, world: int, direct: bool = False) -> dict:
    """This process's share of the chunk files (the world-th part of their bytes, taken as one sequence), read front
    to back in 8 MiB reads. direct: with O_DIRECT into one reused buffer, past the page cache, so that the disk's
    rate is measured with almost no CPU (the page-cache copy and page faults of a plain read are CPU work)."""
    import mmap
    sizes = [os.path.getsize(c) for c in inputs["chunks"]]
    lo, hi = sum(sizes) * rank // world, sum(sizes) * (rank + 1) // world
    buf = mmap.mmap(-1, 8 << 20)  # page-aligned, as O_DIRECT needs
    n, at = 0, 0
    with Timer() as tm:
        for path, size in zip(inputs["chunks"], sizes):
            a, b = max(lo, at) - at, min(hi, at + size) - at
            at += size
            if a < b:
                a -= a % 4096 if direct else 0  # O_DIRECT offsets are block-aligned
                fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                try:
                    while a < b and (got := os.preadv(fd, [buf], a) if direct else len(os.pread(fd, min(8 << 20, b - a), a))):
                        got = min(got, b - a)
                        n, a = n + got, a + got
                finally:
                    os.close(fd)
    return {"bytes": n, "s": tm.s}


def reader_read(inputs: dict, rank: int, world: int) -> dict:
    """One epoch of this rank's TargetReader, as the student opens it."""
    from storage.reader import TargetReader
    reader = TargetReader(inputs["store"], seed=0, rank=rank, world_size=world, batch=GLOBAL_BATCH)
    items = n = 0
    with Timer() as tm:
        for it in reader.epoch(0):
            items, n = items + 1, n + it.hidden.nbytes
    return {"bytes": n, "items": items, "s": tm.s}


def data_wait(inputs: dict, rank: int, world: int, step_s: float, device: str, epochs: int) -> dict:
    """`epochs` epochs of the student's data path at a simulated step of step_s seconds (time.sleep for the
    compute), through one prefetch as stages/student.py's loop runs them."""
    import torch

    from pipeline.config import StudentConfig
    from stages.batches import epoch_batches
    from stages.batches import batch_builder
    from stages.student import batch_split
    from stages.tasks.sample import Sample
    from storage.reader import TargetReader
    s = StudentConfig(global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH)
    micro, accumulation = batch_split(s.global_batch, s.micro_batch, world)
    reader = TargetReader(inputs["store"], seed=s.seed, shuffle_buffer=s.shuffle_buffer, rank=rank, world_size=world,
                          batch=s.global_batch)
    by_id = {q: Sample(q, os.path.join(inputs["images"], f"{q}.jpg"), "What is it?", ("a",))
             for q in (f"q{i:05d}" for i in range(inputs["queries"]))}
    build = batch_builder(bench_lm(), by_id, {}, device, keep=s.prefetch + 3)  # as stages/student.py's run
    walls, slept, logged = [], [], []
    cpu0 = time.process_time()  # every thread of this rank: the loop sleeps, so this is the data path's CPU
    with epoch_batches(reader, 0, 0, s, micro, build, device, until=epochs) as batches:
        for _ in range(epochs * (len(reader) // s.global_batch)):
            t0, sleep, wait = time.perf_counter(), 0.0, 0.0
            for _ in range(accumulation):  # as stages/student.py's loop, the compute replaced by a sleep
                mb = next(batches)
                wait += mb.wait_s
                mb.to(device)
                if device == "cuda":
                    torch.cuda.synchronize()  # the step's compute would wait for its inputs' copy
                a = time.perf_counter()
                time.sleep(step_s / accumulation)
                sleep += time.perf_counter() - a
            walls.append(time.perf_counter() - t0)
            slept.append(sleep)
            logged.append(wait)
    return {"walls": walls, "slept": slept, "logged_wait": logged, "cpu_s": time.process_time() - cpu0,
            "items": len(walls) * s.global_batch // world, "steps_per_epoch": len(reader) // s.global_batch}


JOBS = {"plain": plain_read, "direct": functools.partial(plain_read, direct=True), "reader": reader_read,
        "wait": data_wait}


def _rank(rank: int, world: int, threads: int, jobs, barrier, out) -> None:
    """A rank's process: it runs the jobs it is sent, each started with the other ranks', until None."""
    set_threads(threads)
    while (job := jobs.get()) is not None:
        name, kwargs = job
        barrier.wait()
        try:
            out.put((rank, JOBS[name](rank=rank, world=world, **kwargs)))
        except BaseException:
            out.put((rank, {"error": traceback.format_exc()}))


class Ranks:
    """`world` rank processes, started once (imports cost seconds here), that run one job at a time together."""

    def __init__(self, world: int, threads: int, inputs: dict):
        ctx = mp.get_context("spawn")
        self.root, self.barrier, self.out = os.path.dirname(inputs["store"]), ctx.Barrier(world), ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_rank, args=(r, world, threads, q, self.barrier, self.out))
                      for r, q in enumerate(self.jobs)]
        for p in self.procs:
            p.start()

    def run(self, name: str, warm: bool = False, **kwargs) -> list[dict]:
        """`name` on every rank at once, after evicting the store and images from the page cache (or, warm, after
        reading them into it); per rank, its result."""
        from bench.p4_store import _evict
        _evict(self.root)
        if warm:
            for d, _, names in os.walk(self.root):
                for n in names:
                    with open(os.path.join(d, n), "rb") as f:
                        while f.read(8 << 20):
                            pass
        time.sleep(0.5)  # a settled disk: the fsyncs of the eviction are done
        for q in self.jobs:
            q.put((name, kwargs))
        got = dict(self.out.get() for _ in self.jobs)
        if failed := [r["error"] for r in got.values() if "error" in r]:
            self.close()
            raise SystemExit(f"p6: a {name} rank failed:\n{failed[0]}")
        return [got[r] for r in range(len(self.jobs))]

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join()


def _other_load() -> list[str]:
    """The busiest processes besides this benchmark (and run_all above it): what else ran."""
    mine = {os.getpid(), os.getppid()}
    lines = subprocess.run(["ps", "-eo", "pid,pcpu,ni,args", "--sort=-pcpu"], capture_output=True,
                           text=True).stdout.splitlines()[1:]
    rows = [line.split(None, 3) for line in lines]
    return [f"{cpu}% CPU at nice {ni}: {args[:70]}" for pid, cpu, ni, args in rows
            if int(pid) not in mine and "ps -eo" not in args and float(cpu) >= 5][:4]


def _cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # busy (all but idle and iowait), total jiffies


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.2, help="store size (hidden bytes); the issue asks for at least 2")
    ap.add_argument("--reps", type=int, default=4, help="repetitions of each read measurement")
    ap.add_argument("--steps-ms", type=float, nargs="+", default=[40.0, 100.0], help="simulated compute per step")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per data-wait measurement, through one prefetch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--device", default="", help="cpu or cuda; default cuda when available")
    ap.add_argument("--keep", action="store_true", help="keep the store and images (under BENCH_WORK/p6)")
    args = ap.parse_args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = os.path.join(work_dpath(), "p6")
    others_before, busy0, load_before = _other_load(), _cpu_busy(), loadavg()
    try:
        inputs = write_inputs(root, args.gb)
        print(f"p6: {inputs['queries']} queries, {inputs['hidden_bytes'] / 1e9:.2f} GB of targets written in "
              f"{inputs['write_s']:.0f} s", flush=True)
        reads, waits = [], []
        for world in args.worlds:
            ranks, plain, direct, reader = Ranks(world, args.threads, inputs), [], [], []
            for rep in range(args.reps):  # next to each other, rotating which goes first: the load drifts
                order = ((plain, "plain"), (reader, "reader"), (direct, "direct"))
                for out, job in order[rep % 3:] + order[:rep % 3]:
                    out.append(ranks.run(job, inputs=inputs))
            reads.append(read_row(world, plain, direct, reader))
            print(f"p6: read at {world} rank(s): {reads[-1]['ratio']:.2f} of the plain read", flush=True)
            for step_ms in args.steps_ms:
                waits.append(wait_row(world, step_ms, ranks.run("wait", inputs=inputs, step_s=step_ms / 1000,
                                                                device=device, epochs=args.epochs)))
                print(f"p6: {world} rank(s), {step_ms:.0f} ms steps: data wait {waits[-1]['mean_wait_ms']:.1f} ms "
                      f"per step", flush=True)
            # The same with the store in the page cache: the data path's own cost, without the disk.
            per_rank = ranks.run("wait", warm=True, inputs=inputs, step_s=max(args.steps_ms) / 1000, device=device,
                                 epochs=args.epochs)
            waits.append({**wait_row(world, max(args.steps_ms), per_rank), "warm": True})
            ranks.close()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    busy1 = _cpu_busy()
    emit("p6", {"layers": LAYERS, "d_model": WIDTH, "tokens": list(TOKENS), "queries": inputs["queries"],
                "store_bytes": inputs["store_bytes"], "hidden_bytes": inputs["hidden_bytes"], "write_s": inputs["write_s"],
                "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "threads": args.threads, "device": device,
                "cpus": os.cpu_count(), "reads": reads, "waits": waits,
                "cpu_busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
                "loadavg_during": [load_before, loadavg()], "others": {"before": others_before, "after": _other_load()}})


def read_row(world: int, plain: list[list[dict]], direct: list[list[dict]], reader: list[list[dict]]) -> dict:
    """Per repetition, the aggregate GB/s of the ranks (bytes of all / the slowest rank's time) and per rank."""
    agg = lambda rep: sum(r["bytes"] for r in rep) / max(r["s"] for r in rep) / 1e9  # noqa: E731
    plain_gbs, reader_gbs, direct_gbs = [agg(rep) for rep in plain], [agg(rep) for rep in reader], [agg(rep) for rep in direct]
    paired = [r / p for r, p in zip(reader_gbs, plain_gbs)]  # each pair measured back to back
    per_rank = [r["bytes"] / r["s"] / 1e9 for rep in reader for r in rep]
    items_s = [r["items"] / r["s"] for rep in reader for r in rep]
    return {"world": world, "plain_gb_s": stats(plain_gbs), "reader_gb_s": stats(reader_gbs),
            "reader_rank_gb_s": stats(per_rank), "reader_rank_items_s": stats(items_s),
            "ratio": stats(reader_gbs)["median"] / stats(plain_gbs)["median"], "paired_ratio": stats(paired),
            "direct_gb_s": stats(direct_gbs), "ratio_to_direct": stats(reader_gbs)["median"] / stats(direct_gbs)["median"],
            "rank_bytes": reader[0][0]["bytes"], "rank_items": reader[0][0]["items"]}


def wait_row(world: int, step_ms: float, per_rank: list[dict]) -> dict:
    """Data wait per step (ms): wall − slept, of the rank that waited most at that step (the step waits for it)."""
    steps = list(zip(*[[w - s for w, s in zip(r["walls"], r["slept"])] for r in per_rank]))
    worst = [1000 * max(step) for step in steps]
    logged = [1000 * max(step) for step in zip(*[r["logged_wait"] for r in per_rank])]
    per_epoch = per_rank[0]["steps_per_epoch"]
    return {"world": world, "step_ms": step_ms, "steps": len(worst), "first_step_ms": worst[0], "warm": False,
            "steps_per_epoch": per_epoch, "epoch_start_wait_ms": worst[per_epoch::per_epoch],
            "cpu_ms_per_item": 1000 * sum(r["cpu_s"] for r in per_rank) / sum(r["items"] for r in per_rank),
            "wait_ms": stats(worst[1:]), "mean_wait_ms": float(np.mean(worst[1:])), "logged_wait_ms": stats(logged[1:]),
            "wait_fraction": float(np.mean(worst[1:])) / step_ms}  # of the compute: the stricter reading


if __name__ == "__main__":
    main()
