"""Run the real teacher stage (stages.teacher.run) on the benchmark model and data; print its wall time.

    .venv/bin/python -m bench.make_store --shots 32 --queries 16 --store /tmp/mimic-bench/p3/store-32
"""
from __future__ import annotations

import argparse

from bench.common import Timer, config, emit, loadavg, set_threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, required=True)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--store", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=-1)
    ap.add_argument("--world-size", type=int, default=-1)
    ap.add_argument("--shard-size", type=int, default=8)
    args = ap.parse_args()
    set_threads(args.threads)
    from stages import teacher
    cfg = config(args.store, shots=args.shots, num_queries=args.queries, shard_size=args.shard_size,
                 extra=(f"teacher.rank={args.rank}", f"teacher.world_size={args.world_size}"))
    with Timer() as tm:
        teacher.run(cfg)
    emit("make_store", {"shots": args.shots, "queries": args.queries, "run_s": tm.s, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
