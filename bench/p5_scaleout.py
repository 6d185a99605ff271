"""P5 scale-out: the real teacher (bench.make_store -> stages.teacher.run) as 2 ranks of one thread each
against 1 rank of one thread, whole processes timed from outside (start-up, manifest race and store
included), next to the machine's own ceiling: two independent processes doing plain matrix products
against one.

    .venv/bin/python -m bench.p5_scaleout [--reps 3] [--queries 48] [--shots 16]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench.common import emit, loadavg, stats, work_dpath

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def matmul(n_iter: int) -> None:
    import torch
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(n_iter):
        a = torch.mm(a, b).mul_(1e-2)


def _wall(cmds: list[list[str]]) -> tuple[float, list[dict]]:
    """Start all commands at once; wall time until the last one ends, and each one's last JSON line."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    return wall, [json.loads(o.strip().splitlines()[-1]) for o in outs if o.strip().startswith("{") or "{" in o]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--matmul-iters", type=int, default=3000)
    ap.add_argument("--matmul", type=int, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.matmul:
        return matmul(args.matmul)
    py = sys.executable
    mm = [py, "-m", "bench.p5_scaleout", "--matmul", str(args.matmul_iters)]
    root = os.path.join(work_dpath(), "p5")

    def teacher(store, rank, world):
        return [py, "-m", "bench.make_store", "--shots", str(args.shots), "--queries", str(args.queries),
                "--store", store, "--rank", str(rank), "--world-size", str(world)]
    mm1, mm2, t1, t2, run1, run2, idle = [], [], [], [], [], [], []
    for r in range(args.reps):
        mm1.append(_wall([mm])[0])
        mm2.append(_wall([mm, mm])[0])
        store = os.path.join(root, f"store-1rank-{r}")
        shutil.rmtree(store, ignore_errors=True)
        w, outs = _wall([teacher(store, 0, 1)])
        t1.append(w), run1.append(outs[0]["run_s"])
        # The same command again on the finished store: nothing to write, so this is start-up + manifest alone.
        idle.append(_wall([teacher(store, 0, 1)])[0])
        store = os.path.join(root, f"store-2rank-{r}")
        shutil.rmtree(store, ignore_errors=True)
        w, outs = _wall([teacher(store, 0, 2), teacher(store, 1, 2)])
        t2.append(w), run2.append(max(o["run_s"] for o in outs))
    ceiling = 2 * stats(mm1)["median"] / stats(mm2)["median"]  # throughput of 2 procs over 1
    speedup = stats(t1)["median"] / stats(t2)["median"]
    emit("p5", {"queries": args.queries, "shots": args.shots, "matmul_1proc_s": stats(mm1), "matmul_2proc_s": stats(mm2),
                "ceiling": ceiling, "teacher_1rank_s": stats(t1), "teacher_2rank_s": stats(t2),
                "teacher_1rank_run_s": stats(run1), "teacher_2rank_run_s": stats(run2), "startup_only_s": stats(idle),
                "speedup": speedup, "speedup_in_run": stats(run1)["median"] / stats(run2)["median"],
                "fraction_of_ceiling": speedup / ceiling,
                "queries_per_s_1rank": args.queries / stats(t1)["median"],
                "queries_per_s_2rank": args.queries / stats(t2)["median"], "loadavg": loadavg()})


if __name__ == "__main__":
    main()
