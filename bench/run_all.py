"""Run every benchmark (P1-P5 and the store profile), each in a fresh process with one torch thread,
write bench/results.json and rewrite BENCHMARKS.md from it.

    .venv/bin/python -m bench.run_all            # the full suite, ~10 min on 2 cores
    .venv/bin/python -m bench.run_all --quick    # small settings, to check the scripts (~3 min)
    .venv/bin/python -m bench.run_all --render   # only rewrite BENCHMARKS.md from bench/results.json
    .venv/bin/python -m bench.run_all --only p1 p4   # rerun some; merged into bench/results.json

Results are merged into bench/results.json: a rerun replaces the figures it ran and keeps the others;
every figure carries its own date, machine and load average, and BENCHMARKS.md says which run each came from.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from bench.common import HIDDEN, LAYERS, loadavg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
       "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}

FULL = {
    "p1": ["bench.p1_teacher", "--reps", "7", "--queries", "16", "--shots", "16"],
    "p2": ["bench.p2_student", "--reps", "7", "--queries", "32", "--shots", "8"],
    "p3": ["bench.p3_split", "--queries", "16", "--cached-epochs", "5", "--online-epochs", "3"],
    "p4": ["bench.p4_store", "--reps", "5", "--items", "64", "--shards", "2"],
    "p5": ["bench.p5_scaleout", "--reps", "3", "--queries", "48", "--shots", "16", "--matmul-iters", "200"],
    "profile_store": ["bench.profile_store"],
    "p6": ["bench.p6_realwidth", "--gb", "2.2", "--reps", "4", "--epochs", "3"],
    # trains 6 students (~25 min on 2 idle cores; steps already done in runs/ are reused)
    "p7": ["bench.p7_int8", "--experiment", "runs/toy-attribute"],
}
QUICK = {
    "p1": ["bench.p1_teacher", "--reps", "2", "--queries", "8", "--shots", "8"],
    "p2": ["bench.p2_student", "--reps", "2", "--queries", "16", "--shots", "8"],
    "p3": ["bench.p3_split", "--shots", "4", "32", "--queries", "8", "--cached-epochs", "3", "--online-epochs", "2"],
    "p4": ["bench.p4_store", "--reps", "2", "--items", "32", "--shards", "2"],
    "p5": ["bench.p5_scaleout", "--reps", "1", "--queries", "16", "--shots", "8", "--matmul-iters", "100"],
    "profile_store": ["bench.profile_store"],
    "p6": ["bench.p6_realwidth", "--gb", "0.2", "--reps", "1", "--epochs", "2"],
}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    import torch
    import transformers
    import zarr
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mb": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "zarr": zarr.__version__,
            "kernel": platform.release()}


def run(commands: dict, only: list[str]) -> dict:
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "model": f"random Idefics2 via make_model('idefics2', dir, hidden={HIDDEN}, layers={LAYERS}); float32; "
                    "1 torch thread per process", "commands": {}, "results": {}}
    t0 = time.perf_counter()
    for name, argv in commands.items():
        if only and name not in only:
            continue
        cmd = [sys.executable, "-m", *argv]
        out["commands"][name] = "OMP_NUM_THREADS=1 .venv/bin/python -m " + " ".join(argv)
        before, s0 = loadavg(), time.perf_counter()
        print(f"[run_all] {name}: {out['commands'][name]}  (load {before})", flush=True)
        p = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed ({p.returncode})")
        result = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
        result |= {"loadavg_before": before, "loadavg_after": loadavg(), "wall_s": time.perf_counter() - s0,
                   "date": out["date"]}
        out["results"][name] = result
        print(f"[run_all] {name}: {result['wall_s']:.0f} s", flush=True)
    out["total_s"] = time.perf_counter() - t0
    return out


def merge(old: dict | None, new: dict) -> dict:
    """`new`'s figures over `old`'s: the figures not rerun keep their numbers, date, machine and load.

    Each result records the date of the run that made it (older files have only a top-level date, which
    is copied into their results); `runs` lists every run that contributed, with what it ran.
    """
    if not old:
        old = {"results": {}, "commands": {}, "runs": []}
    if "runs" not in old:  # a file written before merging existed: one run, all of its figures
        old["runs"] = [{"date": old["date"], "machine": old["machine"], "model": old["model"],
                        "total_s": old["total_s"], "ran": list(old["results"])}]
        for r in old["results"].values():
            r.setdefault("date", old["date"])
    runs = [run for run in old["runs"] if set(run["ran"]) - set(new["results"])]  # drop runs fully superseded
    runs.append({"date": new["date"], "machine": new["machine"], "model": new["model"], "total_s": new["total_s"],
                 "ran": list(new["results"])})
    results = {**old["results"], **new["results"]}
    commands = {**old["commands"], **new["commands"]}
    order = list(FULL)
    key = lambda k: order.index(k) if k in order else len(order)  # noqa: E731
    return {"date": max(run["date"] for run in runs), "machine": new["machine"], "model": new["model"],
            "commands": {k: commands[k] for k in sorted(commands, key=key)},
            "results": {k: results[k] for k in sorted(results, key=key)}, "runs": runs,
            "total_s": sum(run["total_s"] for run in runs)}


# -- BENCHMARKS.md -------------------------------------------------------------------------------
def _pm(s: dict, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)})"


def _paired(row: dict, what: str) -> str:
    """' (paired median (min–max))' of a P4 row."""
    return f" (paired {_pm(row[what + '_paired'], fmt='{:.2f}')})"


def _epoch_waits(row: dict) -> str:
    """P6: the mean data wait (ms) over the first epoch (read from the disk) and over the later ones."""
    values, k = row["wait_ms"]["values"], row["steps_per_epoch"]  # values leave out step 0
    later = f"{statistics.mean(values[k - 1:]):.1f}" if values[k - 1:] else "—"
    return f"first epoch {statistics.mean(values[:k - 1]):.1f}, later epochs {later}"


def rows(res: dict) -> list[tuple]:
    """(figure, measured, baseline, ratio, target, met) per target."""
    r, out = res["results"], []
    if "p1" in r:
        p = r["p1"]
        out.append(("P1 teacher / bare forward (time, same batches)", f"{_pm(p['teacher_s'])} s",
                    f"{_pm(p['bare_s'])} s", f"{p['ratio']:.3f} (paired {_pm(p['paired_ratio'])})", "≤ 1.03", p["ratio"] <= 1.03))
    if "p2" in r:
        p = r["p2"]
        out.append(("P2 student epoch, streamed / in RAM", f"{_pm(p['stream_epoch_s'])} s", f"{_pm(p['ram_epoch_s'])} s",
                    f"{p['ratio']:.3f} (paired {_pm(p['paired_ratio'])})", "≤ 1.03", p["ratio"] <= 1.03))
    if "p3" in r:
        p = r["p3"]
        for row in p["rows"]:
            out.append((f"P3 epoch at k={row['shots']}: online / cached", f"{_pm(row['online_epoch_s'])} s",
                        f"{_pm(row['cached_epoch_s'])} s", f"{row['speedup']:.1f}×",
                        "≥ 10×" if row["shots"] == p["k_hi"] else "—",
                        row["speedup"] >= 10 if row["shots"] == p["k_hi"] else None))
        rss = {row["shots"]: row for row in p["rows"]}
        lo, hi = p["k_lo"], p["k_hi"]
        out.append((f"P3 cached student peak RSS, k={hi} / k={lo}", f"{rss[hi]['cached_maxrss_mb']:.0f} MB",
                    f"{rss[lo]['cached_maxrss_mb']:.0f} MB", f"{p['cached_rss_ratio']:.3f}", "≤ 1.1", p["cached_rss_ratio"] <= 1.1))
        out.append((f"P3 online student peak RSS, k={hi} / k={lo} (for comparison)", f"{rss[hi]['online_maxrss_mb']:.0f} MB",
                    f"{rss[lo]['online_maxrss_mb']:.0f} MB", f"{p['online_rss_ratio']:.3f}", "—", None))
    if "p4" in r:
        for row in r["p4"]["rows"]:
            d = row["dtype"]
            if row.get("layers", LAYERS) != LAYERS:  # the real-width row: shards as real runs write them
                d = f"{d} at real width ({row['layers']} × {row['d_model']}, {row['shard_mb']:.0f} MB shards)"
            out.append((f"P4 {d} write: store / plain file", f"{row['write_store_mb_s']:.0f} MB/s",
                        f"{row['write_raw_mb_s']:.0f} MB/s", f"{row['write_fraction_of_raw']:.2f}{_paired(row, 'write')}", "≥ 0.7",
                        row["write_fraction_of_raw"] >= 0.7))
            out.append((f"P4 {d} read (cold): store / plain file", f"{row['read_store_mb_s']:.0f} MB/s",
                        f"{row['read_raw_mb_s']:.0f} MB/s", f"{row['read_fraction_of_raw']:.2f}{_paired(row, 'read')}", "≥ 0.7",
                        row["read_fraction_of_raw"] >= 0.7))
            half = d in ("float16", "bfloat16")
            out.append((f"P4 {d} bytes on disk per stored value", f"{row['bytes_per_value']:.4f}",
                        f"{row['bytes_on_disk'] / 1e6:.1f} MB / {row['values'] / 1e6:.1f} M values", "—",
                        "≤ 2.0" if half else "—", row["bytes_per_value"] <= 2.0 if half else None))
        ranks = r["p4"].get("ranks")
        for row in ranks["rows"] if ranks else ():
            w = row["world"]
            out.append((f"P4 bytes read from disk per rank per epoch, {w} rank{'s' * (w > 1)} (largest rank) / "
                        f"(store bytes / {w})", f"{row['worst_rank_bytes'] / 1e6:.2f} MB",
                        f"{ranks['store_bytes'] / 1e6 / w:.2f} MB", f"{row['fraction_of_share']:.3f}", "≤ 1.05",
                        row["fraction_of_share"] <= 1.05))
        codecs = {c["codec"]: c for c in r["p4"].get("compression", [])}
        for name, c in codecs.items():
            if name != "none":
                out.append((f"P4 bfloat16 compressed with {name} (zarr codec, 1 thread) / uncompressed: size, "
                            f"write, cold read", f"write {c['write_mb_s']:.0f} MB/s, read {c['read_mb_s']:.0f} MB/s",
                            f"write {codecs['none']['write_mb_s']:.0f} MB/s, read {codecs['none']['read_mb_s']:.0f} MB/s",
                            f"{1 / c['ratio']:.2f} of the bytes; write {c['write_mb_s'] / codecs['none']['write_mb_s']:.2f}, "
                            f"read {c['read_mb_s'] / codecs['none']['read_mb_s']:.2f}", "—", None))
    if "p5" in r:
        p = r["p5"]
        out.append(("P5 machine ceiling: 2 matmul procs / 1 (throughput)", f"{_pm(p['matmul_2proc_s'])} s",
                    f"{_pm(p['matmul_1proc_s'])} s", f"{p['ceiling']:.2f}×", "—", None))
        out.append(("P5 teacher 2 ranks × 1 thread / 1 rank × 1 thread (throughput)", f"{_pm(p['teacher_2rank_s'])} s",
                    f"{_pm(p['teacher_1rank_s'])} s", f"{p['speedup']:.2f}× = {p['fraction_of_ceiling']:.2f} of ceiling",
                    "≥ 0.9 of ceiling", p["fraction_of_ceiling"] >= 0.9))
    if "p6" in r:
        p, gb = r["p6"], r["p6"]["hidden_bytes"] / 1e9
        for row in p["reads"]:
            w = row["world"]
            out.append((f"P6 read at real width ({gb:.1f} GB), {w} rank{'s' * (w > 1)} at once: store / plain sequential "
                        f"read of the same files (cold)", f"{row['reader_gb_s']['median']:.2f} GB/s; per rank "
                        f"{row['reader_rank_gb_s']['median']:.2f} GB/s, {row['reader_rank_items_s']['median']:.1f} items/s",
                        f"{_pm(row['plain_gb_s'], fmt='{:.2f}')} GB/s (with O_DIRECT: "
                        f"{_pm(row['direct_gb_s'], fmt='{:.2f}')} GB/s)",
                        f"{row['ratio']:.2f} (paired {_pm(row['paired_ratio'], fmt='{:.2f}')}; of O_DIRECT "
                        f"{row['ratio_to_direct']:.2f})", "≥ 0.9", row["ratio"] >= 0.9))
        for row in p["waits"]:
            w, ms = row["world"], row["step_ms"]
            target = w == 2 and ms == 100 and not row["warm"]
            out.append((f"P6 data wait per step at real width, {w} rank{'s' * (w > 1)}, simulated {ms:.0f} ms step "
                        f"(a sleep){', store in the page cache' if row['warm'] else ''} / the step", f"{row['mean_wait_ms']:.1f} ms (median {row['wait_ms']['median']:.1f})",
                        f"{ms:.0f} ms", f"{row['wait_fraction']:.1%}", "≤ 3 %" if target else "—",
                        row["wait_fraction"] <= 0.03 if target else None))
    if "p7" in r:
        p, tasks = r["p7"], r["p7"]["per_task"].values()
        b, q = p["mean"]["bfloat16"], p["mean"]["int8"]
        out.append(("P7 int8 targets: bytes per value / bfloat16's (toy d = 128; at d = 4096 by the format: 0.516)",
                    f"{q['bytes_per_value']:.4f}", f"{b['bytes_per_value']:.4f}", f"{p['mean']['int8_vs_bfloat16']['bytes']:.3f}",
                    "≤ 0.55", p["mean"]["int8_vs_bfloat16"]["bytes"] <= 0.55))
        out.append(("P7 relative reconstruction error per token and layer, against the float32 outputs: int8 / bfloat16",
                    f"{q['rel_error_mean']:.4f} (p99 {q['rel_error_p99']:.4f})", f"{b['rel_error_mean']:.4f}",
                    f"{q['rel_error_mean'] / b['rel_error_mean']:.1f}×", "—", None))
        ratio = p["mean"]["int8_vs_bfloat16"]["l_align_held_out"]
        out.append((f"P7 held-out L_align of MSE-only students, int8-trained / bfloat16-trained ({len(tasks)} tasks)",
                    f"{q['l_align_held_out']:.5f}", f"{b['l_align_held_out']:.5f}", f"{ratio:.4f}", "within 2 %",
                    abs(ratio - 1) <= 0.02))
        diffs = [t["int8"]["accuracy"] - t["bfloat16"]["accuracy"] for t in tasks]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        out.append((f"P7 MSE-only accuracy on the attribute family, int8 − bfloat16 ({len(tasks)} tasks × {p['num_samples']} "
                    "queries)", f"{q['accuracy']:.1f}", f"{b['accuracy']:.1f}",
                    f"{statistics.fmean(diffs):+.1f} ± {se:.1f} points", "within noise",
                    all(abs(d) <= 100 / p["num_samples"] ** 0.5 for d in diffs)))
    return out


def _machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores (virtual, shared with other jobs), {m['mem_mb']} MB RAM, "
            f"Linux {m['kernel']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, zarr {m['zarr']}")


def _runs_lines(res: dict) -> list[str]:
    runs = res.get("runs") or [{"date": res["date"], "machine": res["machine"], "total_s": res["total_s"],
                                "ran": list(res["results"])}]
    lines = []
    for run in runs:
        here = [k for k in run["ran"] if res["results"].get(k, {}).get("date", res["date"]) == run["date"]]
        since = [k for k in run["ran"] if k not in here]
        lines.append(f"- run of {run['date']} ({run['total_s'] / 60:.1f} min): {', '.join(here)}"
                     + (f" (it also ran {', '.join(since)}, rerun since)" if since else ""))
    machines = {_machine_line(run["machine"]) for run in runs}
    if len(machines) == 1:
        lines.append(f"- machine (every run): {machines.pop()}")
    else:
        lines += [f"- machine of the run of {run['date']}: {_machine_line(run['machine'])}" for run in runs]
    return lines


def render(res: dict) -> str:
    r = res["results"]
    lines = [
        "# Benchmarks", "",
        "Every figure is a ratio of two things measured in the same run, alternating where they share a process;",
        "cells show the median of the repetitions and (min–max). Written by `bench/run_all.py` from `bench/results.json`;",
        "do not edit by hand.", "",
        "## Reproduce", "",
        "```bash", ".venv/bin/python -m bench.run_all      # every figure below, one torch thread per process", "```", "",
        "Each benchmark, as run:", "",
        "```bash", *res["commands"].values(), "```", "",
        "`bench/gpu.sh` times teacher and student on a lent H100/H200, then P6's data path there (see its header); it "
        "has not been run here.", "",
        "## Runs", "",
        *_runs_lines(res),
        f"- model: {res['model']}",
        "- per benchmark, date of its run and load average (/proc/loadavg, 1 min) before → after: "
        + "; ".join(f"{k} {v.get('date', res['date'])[:16].replace('T', ' ')} {v['loadavg_before'].split()[0]}→"
                    f"{v['loadavg_after'].split()[0]}" for k, v in r.items()),
        "", "## Results", "",
        "| figure | measured | baseline | ratio | target | met |", "|---|---|---|---|---|---|",
    ]
    for fig, meas, base, ratio, target, met in rows(res):
        lines.append(f"| {fig} | {meas} | {base} | {ratio} | {target} | {'—' if met is None else ('yes' if met else '**no**')} |")
    lines += ["", "## Details", ""]
    if "p1" in r:
        p = r["p1"]
        lines.append(f"- P1: {p['queries']} queries, k = {p['shots']}, {p['prompt_tokens']} prompt tokens per pass; bare "
                     f"{p['bare_tokens_per_s']:.0f} tokens/s, teacher {p['teacher_tokens_per_s']:.0f} tokens/s; "
                     + (f"{p['shards']} shards per pass, each written on the teacher's background thread "
                        f"(write_shard incl. fsync and publish {p['write_shard_s_per_rep']:.3f} s per pass); the teacher "
                        f"thread waited on writes {_pm(p['write_wait_s'])} s per pass, of which the last shard's "
                        f"(not overlapped) {_pm(p['last_write_wait_s'])} s."
                        if p.get("background_write") else
                        f"write_shard (incl. fsync and publish) {p['write_shard_s_per_rep']:.3f} s per pass."))
    if "p2" in r:
        p = r["p2"]
        lines.append(f"- P2: {p['queries']} queries, {p['steps_per_epoch']} steps per epoch, {p['step_ms_ram']:.0f} ms per step in RAM.")
    if "p3" in r:
        for row in r["p3"]["rows"]:
            be = row["break_even_epochs"]
            lines.append(f"- P3 k = {row['shots']}: teacher once {row['teacher_once_s']:.1f} s; the split is cheaper in total "
                         f"after {be:.1f} epochs" if be else f"- P3 k = {row['shots']}: online not slower")
    if "p4" in r and r["p4"].get("ranks"):
        p = r["p4"]["ranks"]
        lines.append(f"- P4 bytes per rank: a bfloat16 store of {p['items']} items, {p['store_bytes'] / 1e6:.2f} MB on disk, global "
                     f"batch {p['batch']}; read_bytes of /proc/self/io around one epoch of each rank's TargetReader, the store "
                     "evicted from the page cache (posix_fadvise DONTNEED) before each rank; read / the `hidden` bytes of the "
                     "rank's own items: " + "; ".join(
                         f"{row['world']} rank{'s' * (row['world'] > 1)}: " + ", ".join(
                             f"rank {k} {v:.3f}" for k, v in row["read_over_own"].items()) for row in p["rows"]) + ".")
    if "p5" in r:
        p = r["p5"]
        lines.append(f"- P5: {p['queries']} queries, k = {p['shots']}; start-up alone (same command on the finished store) "
                     f"{_pm(p['startup_only_s'])} s; inside teacher.run only: speedup {p['speedup_in_run']:.2f}×; "
                     f"{p['queries_per_s_1rank']:.2f} vs {p['queries_per_s_2rank']:.2f} queries/s.")
    if "p6" in r:
        p = r["p6"]
        lines.append(f"- P6: a bfloat16 store of {p['queries']} queries of {p['tokens'][0]}–{p['tokens'][1] - 1} span tokens "
                     f"at {p['layers']} × {p['d_model']} ({p['hidden_bytes'] / 1e9:.2f} GB of targets, written through "
                     f"storage.writer in {p['write_s']:.0f} s), one COCO-sized JPEG per query; global batch "
                     f"{p['global_batch']}, micro batch {p['micro_batch']}, {p['threads']} torch thread per rank, device "
                     f"{p['device']}, student.prefetch and prefetch_mb at their defaults; "
                     f"{p['waits'][0]['steps'] // p['waits'][0]['steps_per_epoch']} epoch(s) of "
                     f"{p['waits'][0]['steps_per_epoch']} steps per measurement through one prefetch, "
                     "the first epoch read from the disk, the later ones from the page cache. Data wait = a step's wall time "
                     "− the time slept, of the rank that waited most, the first step (the prefetch filling) left out: "
                     + "; ".join(f"{row['world']} rank(s) at {row['step_ms']:.0f} ms{' warm' if row['warm'] else ''}: first "
                                 f"step {row['first_step_ms']:.0f} ms, then {row['mean_wait_ms']:.1f} ms ({_epoch_waits(row)}; median "
                                 f"{row['wait_ms']['median']:.1f}; the loop's own data_wait_s {row['logged_wait_ms']['median']:.1f} ms "
                                 f"median; at the later epochs' first steps "
                                 f"{', '.join(f'{x:.0f}' for x in row['epoch_start_wait_ms']) or '—'} ms), CPU "
                                 f"{row['cpu_ms_per_item']:.0f} ms per item" for row in p["waits"])
                     + f". Load: {p['cpus']} CPUs, busy {p['cpu_busy']:.0%} of the time over the run; load average "
                     f"{p['loadavg_during'][0].split()[0]} → {p['loadavg_during'][1].split()[0]}; other processes at the "
                     f"start: {'; '.join(p['others']['before']) or 'none above 5 % CPU'}; at the end: "
                     f"{'; '.join(p['others']['after']) or 'none above 5 % CPU'}.")
    if "p7" in r:
        p = r["p7"]
        lines.append("- P7: per attribute task, its 8-shot teacher's float32 store (1,000 queries) converted to bfloat16 and "
                     "int8 (`pipeline cache convert`: the teacher's own stores bit for bit), an MSE-only student (10 epochs) "
                     "on each, evaluated as MimIC and by L_align on a held-out bfloat16 store of 128 validation queries (steps "
                     "done before are reused, so a run's wall time is only what was left to do). "
                     "Per task, int8 vs bfloat16: " + "; ".join(
                         f"task {u}: accuracy {t['int8']['accuracy']:.1f} vs {t['bfloat16']['accuracy']:.1f}, L_align "
                         f"{t['int8']['l_align_held_out']:.5f} vs {t['bfloat16']['l_align_held_out']:.5f}"
                         for u, t in p["per_task"].items())
                     + ". At real width this machine has no real activations: on synthetic vectors of 4,096 Gaussian values "
                     "with 2 set to an outlier of s standard deviations, the relative error of the other values is "
                     + "; ".join(f"s = {row['outlier_sd']}: {row['rel_error_group_128']:.3f} with the store's scale per 128 "
                                 f"values, {row['rel_error_per_vector']:.3f} with one per vector" for row in p["synthetic_outliers"])
                     + " (why the store scales groups: one scale per vector loses the rest of a vector with a massive activation).")
    if "profile_store" in r:
        w, rd = r["profile_store"]["write"], r["profile_store"]["read_load_items"]
        g = lambda d, k: d.get(k, {}).get("cum_s", 0.0)  # noqa: E731
        when = r["profile_store"].get("date", res["date"])
        lines += ["", "Store profile (`bench.profile_store`, cProfile, 2 float16 shards of 64 items, "
                  f"{r['profile_store']['files']} files and {r['profile_store']['dirs']} directories per store; run of {when}):", "",
                  f"- write_shard × 2 (with open_for_write): {w['total_s']:.3f} s; of it, on the calling thread: writing the "
                  f"files {g(w, 'write_arrays'):.3f} s, CRC-32s {g(w, 'checksum'):.3f} s (taken while the fsyncs run on "
                  f"other threads), packing {g(w, '_shard_arrays'):.3f} s, manifest and markers (`create`, with their own "
                  f"fsyncs) {g(w, 'create'):.3f} s",
                  f"- reading every item of both shards (the prefetch thread's `_load_ahead`, cold): {rd['total_s']:.3f} s; "
                  f"of it waiting for the item reads (one byte range each, 8 in flight on other threads) "
                  f"{g(rd, 'acquire'):.3f} s, the small arrays (`read_meta`) {g(rd, 'read_meta'):.3f} s"]
    lines += ["", "## Missed targets: profile and limiting cause", "", MISSES_NOTE, ""]
    return "\n".join(lines)


MISSES_NOTE = "(see the table: this section is filled in from the latest run's analysis in bench/analysis.md)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--only", nargs="*", default=[])
    args = ap.parse_args()
    if args.render:
        res = json.load(open(RESULTS))
    else:
        res = run(QUICK if args.quick else FULL, args.only)
        path = RESULTS if not args.quick else RESULTS.replace(".json", "-quick.json")
        if not args.quick and os.path.isfile(RESULTS):
            res = merge(json.load(open(RESULTS)), res)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    analysis = os.path.join(REPO, "bench", "analysis.md")
    global MISSES_NOTE
    if os.path.isfile(analysis):
        MISSES_NOTE = open(analysis).read().strip()
    md = render(res)
    if not args.quick:
        with open(os.path.join(REPO, "BENCHMARKS.md"), "w") as f:
            f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
