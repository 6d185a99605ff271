"""P2 student data path: an epoch of student steps with targets streamed from the store (TargetReader,
as stages/student.py) against the same epoch with the same items already in RAM, alternating, in one process.

    .venv/bin/python -m bench.p2_student [--reps 7] [--queries 32] [--shots 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bench.common import Timer, config, emit, loadavg, set_threads, stats, work_dpath
from bench.student_loop import cached_epoch, setup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    store = os.path.join(work_dpath(), "p2", f"store-{args.shots}shot-{args.queries}q")
    if not os.path.isfile(os.path.join(store, "manifest.json")):  # the real teacher, in its own process
        subprocess.run([sys.executable, "-m", "bench.make_store", "--shots", str(args.shots), "--queries",
                        str(args.queries), "--store", store], check=True, stdout=subprocess.DEVNULL)
    cfg = config(store, shots=args.shots, num_queries=args.queries)
    S = setup(cfg)
    steps = len(S.reader) // cfg.student.global_batch
    cached_epoch(S, S.reader.epoch(0), steps)  # warm-up
    t_stream, t_ram = [], []
    for r in range(args.reps):
        epoch = r + 1
        in_ram = list(S.reader.epoch(epoch))  # the same items in the same order, read before the clock starts
        with Timer() as a:
            cached_epoch(S, in_ram, steps)
        with Timer() as b:
            cached_epoch(S, S.reader.epoch(epoch), steps)
        t_ram.append(a.s)
        t_stream.append(b.s)
    ratios = [b / a for a, b in zip(t_ram, t_stream)]
    emit("p2", {"queries": args.queries, "shots": args.shots, "threads": args.threads, "steps_per_epoch": steps,
                "ram_epoch_s": stats(t_ram), "stream_epoch_s": stats(t_stream), "paired_ratio": stats(ratios),
                "ratio": stats(t_stream)["median"] / stats(t_ram)["median"],
                "step_ms_ram": 1000 * stats(t_ram)["median"] / steps, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
