"""P3 the split against the authors' design, at k = 4, 8, 16, 32.

For each k: the real teacher stage writes a store (its one-time cost is reported), then two fresh child
processes run only the student loop for a few epochs: `cached` reads the store, `online` runs the k-shot
teacher forward without grad inside every step (bench/student_loop.py). Each child reports its epoch
times and its own peak RSS (getrusage RUSAGE_SELF ru_maxrss), so no number is inflated by another loop.

    .venv/bin/python -m bench.p3_split [--shots 4 8 16 32] [--queries 16]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from bench.common import emit, loadavg, work_dpath


def child(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-m", *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--cached-epochs", type=int, default=5)
    ap.add_argument("--online-epochs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for k in args.shots:
        store = os.path.join(work_dpath(), "p3", f"store-{k}shot")
        shutil.rmtree(store, ignore_errors=True)
        made = child("bench.make_store", "--shots", str(k), "--queries", str(args.queries), "--store", store)
        cached = child("bench.student_loop", "--mode", "cached", "--shots", str(k), "--queries", str(args.queries),
                       "--store", store, "--epochs", str(args.cached_epochs))
        online = child("bench.student_loop", "--mode", "online", "--shots", str(k), "--queries", str(args.queries),
                       "--epochs", str(args.online_epochs))
        c, o = cached["epoch_s"]["median"], online["epoch_s"]["median"]
        rows.append({"shots": k, "teacher_once_s": made["run_s"], "cached_epoch_s": cached["epoch_s"],
                     "online_epoch_s": online["epoch_s"], "speedup": o / c,
                     "cached_maxrss_mb": cached["maxrss_mb"], "online_maxrss_mb": online["maxrss_mb"],
                     # epochs after which teacher-once + cached epochs cost less than online epochs
                     "break_even_epochs": made["run_s"] / (o - c) if o > c else None})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    by_k = {r["shots"]: r for r in rows}
    lo, hi = min(by_k), max(by_k)
    emit("p3", {"queries": args.queries, "rows": rows, "speedup_at_max_k": by_k[hi]["speedup"],
                "cached_rss_ratio": by_k[hi]["cached_maxrss_mb"] / by_k[lo]["cached_maxrss_mb"],
                "online_rss_ratio": by_k[hi]["online_maxrss_mb"] / by_k[lo]["online_maxrss_mb"],
                "k_lo": lo, "k_hi": hi, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
