"""P1 teacher overhead: the teacher's loop (forward under SpanCapture, items, write_shard) against a bare
forward of the same pre-encoded batches, alternating, in one process with one DeepSpeed inference engine.

Prompt building and encoding are done once, before timing, and excluded from both sides: the ratio
isolates what the teacher adds to the forward (capture hooks, the span copy, packing, zarr write, fsync, publish).

    .venv/bin/python -m bench.p1_teacher [--reps 5] [--queries 16] [--shots 16]
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch

from bench.common import Timer, config, emit, loadavg, prompt_tokens, set_threads, stats, teacher_batches, \
    teacher_manifest, work_dpath


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    from stages.teacher import SpanCapture, _load_teacher
    from storage.writer import Item, open_for_write

    store_root = os.path.join(work_dpath(), "p1")
    cfg = config(os.path.join(store_root, "store"), shots=args.shots, num_queries=args.queries)
    lm, engine = _load_teacher(cfg)
    manifest = teacher_manifest(cfg, lm)
    batches = teacher_batches(cfg, lm)
    layers = lm.adapter.decoder_layers(lm.model)

    def bare():
        for b in batches:
            with torch.inference_mode():
                engine(**b.enc.inputs)

    write_s = []

    def teacher(store: str):
        capture = SpanCapture(layers, cfg.teacher.capture)
        writer = open_for_write(store, manifest)
        items, shard = [], batches[0].shard
        for b in batches:
            if b.shard != shard:
                with Timer() as w:
                    writer.write_shard(shard, items)
                write_s.append(w.s)
                items, shard = [], b.shard
            capture.keep = max(b.enc.span_lens)
            with torch.inference_mode():
                engine(**b.enc.inputs)
            hidden_bkld = capture.stacked()
            for row, ((q, v), ids, n) in enumerate(zip(b.jobs, b.icd_ids, b.enc.span_lens)):
                items.append(Item(q.id, v, np.asarray(b.enc.span_ids[row], dtype=np.int32), hidden_bkld[row, -n:], tuple(ids)))
        with Timer() as w:
            writer.write_shard(shard, items)
        write_s.append(w.s)
        for h in capture.handles:
            h.remove()

    bare()  # warm-up (allocator, first-call paths)
    t_bare, t_teacher = [], []
    for r in range(args.reps):
        store = os.path.join(store_root, f"store-{r}")
        shutil.rmtree(store, ignore_errors=True)
        with Timer() as a:
            bare()
        with Timer() as b:
            teacher(store)
        t_bare.append(a.s)
        t_teacher.append(b.s)
        shutil.rmtree(store, ignore_errors=True)
    ratios = [b / a for a, b in zip(t_bare, t_teacher)]
    tokens = prompt_tokens(batches)
    emit("p1", {"queries": args.queries, "shots": args.shots, "threads": args.threads, "prompt_tokens": tokens,
                "bare_s": stats(t_bare), "teacher_s": stats(t_teacher), "paired_ratio": stats(ratios),
                "write_shard_s_per_rep": sum(write_s) / (args.reps + 0), "ratio": stats(t_teacher)["median"] / stats(t_bare)["median"],
                "bare_tokens_per_s": tokens / stats(t_bare)["median"],
                "teacher_tokens_per_s": tokens / stats(t_teacher)["median"], "loadavg": loadavg()})


if __name__ == "__main__":
    main()
