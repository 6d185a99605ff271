"""P7 8-bit targets (issue 19): what teacher.store_dtype=int8 costs against bfloat16 targets from the same teacher.

On tasks of the toy attribute family (stages/tasks/toy_attribute.py; the toy model runs in float32), per task:
  - one 8-shot teacher store in float32 (the exact outputs; with --experiment, the one `pipeline experiment
    toy-icl --family attribute` made), converted to bfloat16 and to int8 by `pipeline cache convert`, which gives
    the stores the teacher writes with teacher.store_dtype=bfloat16 or int8, bit for bit (tests/test_teacher.py);
  - reconstruction error of bfloat16 and int8 against float32: per token and layer, ||x_stored - x|| / ||x||;
  - bytes per stored value (on disk, the store's `hidden` and `hidden_scale` files over the values they hold);
  - MSE-only students (student.w_ce=0, the experiment's 10 epochs) from the bfloat16 and from the int8 store;
    their accuracy as MimIC on the validation queries, and their L_align on a held-out bfloat16 store of
    validation queries (`pipeline eval --mode align`).
And at Idefics2-8b's width, where this machine has no real activations: synthetic vectors of d = 4096 Gaussian
values, with 2 of them set to an outlier of 20, 100 or 1000 standard deviations (LLMs' "massive activations"),
quantized with one scale per group of 128 (the store's rule) and, for comparison, one scale per vector.
Steps already done (same config) are not redone, so a killed run resumes.

    .venv/bin/python -m bench.p7_int8 [--tasks 0,1,2] [--out runs/bench-int8] [--num-samples 128] [--experiment runs/toy-attribute]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from bench.common import emit
from pipeline.config import load_config
from pipeline.defaults import resolve
from pipeline.experiment import N_TRAIN, _done, _evaluated, families

DTYPES = ("float32", "bfloat16", "int8")
HELD_OUT = 128  # validation queries of the held-out store


def _stored_bytes(store: str) -> int:
    """Bytes of the target values on disk: every shard's `hidden` chunk, and `hidden_scale` for int8."""
    total = 0
    for dpath, _, names in os.walk(os.path.join(store, "shards")):
        if os.path.basename(dpath) in ("hidden", "hidden_scale"):
            total += sum(os.path.getsize(os.path.join(dpath, n)) for n in names if n != "zarr.json")
    return total


def reconstruction(exact: str, stored: str) -> dict:
    """||x_stored - x|| / ||x|| per token and layer (mean, 99th percentile, max), and bytes per value."""
    from storage.reader import read_items
    errors, n_values = [], 0
    for a, b in zip(read_items(exact), read_items(stored), strict=True):
        x, y = a.hidden.float(), b.hidden.float()
        norm = x.norm(dim=-1)
        errors.append(((y - x).norm(dim=-1)[norm > 0] / norm[norm > 0]).flatten().numpy())
        n_values += x.numel()
    e = np.concatenate(errors)
    return {"rel_error_mean": float(e.mean()), "rel_error_p99": float(np.percentile(e, 99)), "rel_error_max": float(e.max()),
            "bytes_per_value": _stored_bytes(stored) / n_values}


def synthetic_outliers(n: int = 256, d: int = 4096) -> list[dict]:
    """||x_int8 - x|| / ||x|| over the non-outlier values, per group of 128 (layout.quantize) and per vector."""
    from storage.layout import dequantize, quantize
    rng, rows = np.random.default_rng(0), []
    for outlier in (0, 20, 100, 1000):
        x = rng.standard_normal((n, d)).astype(np.float32)
        if outlier:
            x[:, [7, 2001]] = outlier
        rest = np.ones(d, bool)
        rest[[7, 2001]] = False
        s = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)  # one scale per vector, by hand
        by_vector = np.clip(np.rint(x / s), -127, 127) * s
        by_group = dequantize(*quantize(x))

        def error(y):
            return float((np.linalg.norm((y - x)[:, rest], axis=1) / np.linalg.norm(x[:, rest], axis=1)).mean())
        rows.append({"outlier_sd": outlier, "rel_error_group_128": error(by_group), "rel_error_per_vector": error(by_vector)})
    return rows


def task(out: str, u: int, num_samples: int, experiment: str | None, log) -> dict:
    from stages import student, teacher
    from stages.evaluate import run as evaluate
    from stages.tasks.toy_icl import model_dpath
    from storage.convert import convert

    family = families()["attribute"]
    root, run_dir = os.path.join(experiment or out, "data", f"attribute{u}"), os.path.join(out, f"attribute{u}")
    family.write(root, u, N_TRAIN)  # a no-op once complete
    base = (f"model.path={model_dpath()}", f"task.root={root}", f"run_dir={run_dir}", "teacher.sampler=cover",
            "eval.sampler=cover", "task.support=train", f"task.num_queries={N_TRAIN}", "teacher.shots=8",
            f"eval.num_samples={num_samples}", "student.epochs=10", "student.w_ce=0")

    def cfg(*overrides):
        return resolve(load_config(None, [*base, *overrides]))

    stores = {d: os.path.join(run_dir, f"store-{d}") for d in DTYPES}
    if experiment:
        stores["float32"] = os.path.join(experiment, f"attribute{u}", "store-vqav2-8shot")
    teacher.run(cfg("teacher.store_dtype=float32", f"teacher.store={stores['float32']}"))  # a no-op once complete
    for d in ("bfloat16", "int8"):
        t0 = time.perf_counter()
        convert(stores["float32"], stores[d], d)
        log(f"attribute{u}: {d} store converted in {time.perf_counter() - t0:.0f} s")
    held_out = os.path.join(run_dir, "store-heldout-bfloat16")
    teacher.run(cfg("teacher.store_dtype=bfloat16", f"teacher.store={held_out}", "task.query_split=val",
                    f"task.num_queries={HELD_OUT}"))
    result = {d: reconstruction(stores["float32"], stores[d]) for d in ("bfloat16", "int8")}
    for d in ("bfloat16", "int8"):
        s_out = os.path.join(run_dir, f"student-mse_only-{d}")
        run_cfg = cfg(f"teacher.store={stores[d]}", f"student.out={s_out}")
        if not _done(s_out, os.path.join("heads", "heads.safetensors"), run_cfg):
            student.run(run_cfg)
        heads = f"eval.heads={s_out}/heads"
        result[d]["accuracy"] = _evaluated(cfg(f"teacher.store={stores[d]}", "eval.mode=mimic", heads,
                                               f"eval.out={run_dir}/eval-mimic-{d}"))["vqa_accuracy"]
        align_cfg = cfg(f"teacher.store={held_out}", "eval.mode=align", heads, f"eval.out={run_dir}/eval-align-{d}")
        result[d]["l_align_held_out"] = (json.load(open(os.path.join(align_cfg.eval.out, "metrics.json")))
                                         if _done(align_cfg.eval.out, "metrics.json", align_cfg)
                                         else evaluate(align_cfg))["l_align_trained"]
        log(f"attribute{u} {d}: {result[d]}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="0,1,2", help="attribute tasks u (u %% 3 is the attribute, u // 3 the data seed)")
    ap.add_argument("--out", default="runs/bench-int8")
    ap.add_argument("--num-samples", type=int, default=128, help="validation queries per task for the accuracy")
    ap.add_argument("--experiment", help="a `pipeline experiment toy-icl --family attribute` output: take its data "
                                         "and 8-shot float32 stores instead of making them again")
    args = ap.parse_args()
    t0 = time.perf_counter()
    per_task = {u: task(args.out, u, args.num_samples, args.experiment, print) for u in map(int, args.tasks.split(","))}
    summary = {}
    for d in ("bfloat16", "int8"):
        summary[d] = {k: statistics.fmean(r[d][k] for r in per_task.values()) for k in per_task[next(iter(per_task))][d]}
    summary["int8_vs_bfloat16"] = {"bytes": summary["int8"]["bytes_per_value"] / summary["bfloat16"]["bytes_per_value"],
                                   "l_align_held_out": summary["int8"]["l_align_held_out"] / summary["bfloat16"]["l_align_held_out"]}
    result = {"bench": "p7_int8", "tasks": list(per_task), "num_samples": args.num_samples, "per_task": per_task,
              "synthetic_outliers": synthetic_outliers(),
              "mean": summary, "minutes": (time.perf_counter() - t0) / 60, "loadavg_end": open("/proc/loadavg").read().strip()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    emit("p7_int8", {k: v for k, v in result.items() if k != "bench"})  # the line bench.run_all reads


if __name__ == "__main__":
    main()
