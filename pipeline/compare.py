"""Is the teacher worth it? (issue 20): every student method beside zero-shot and k-shot ICL, from one store per task.

On each task u of a toy family (pipeline/experiment.py's families, data and configs):

    data(u) -> teacher(k = SHOTS, all N_TRAIN queries, with its answer-token distributions for LIVE): ONE store
            -> eval zero-shot, eval k-shot ICL
            -> for N in the sizes, for each method: a student on the store's first N queries (student.num_queries),
               the same number of optimiser steps whatever N -> eval it (--mode trained)

The demonstrations are those the teacher drew from the whole training split (task.support=train), whatever N.
Every step is a stage's own `run(cfg)` and one whose output is complete with the same config is not redone
(experiment.py's rule), so a killed comparison resumes. The student's and the teacher's wall seconds are timed
around their `run` and kept beside what they made (wall.json in the student's directory, teacher.json in the
task's), so a resumed comparison reports them too; a teacher run that only finds its store complete is no
teacher's time and is not recorded. Writes results.json, results.md and accuracy_vs_n.png.

Which methods need the teacher follows from what they train on (reads_teacher): L_align at a weight above 0, or
LIVE's KL. With the weights below, MimIC, MSE only, LIVE and MimIC + LoRA (joint, w_align 1 by default) need it;
MimIC at w_align = 0, LoRA and LoRA† (the authors' LoRA config: w_align 0), prompt tuning and virtual-kv (w_align
0 by default, METHOD_DEFAULTS) train on L_gt alone: they read the store's queries and answers, which a teacher-free
user has without one.

The default grid (STEPS, SIZES, the command's 4 tasks) is sized to run in about an hour on the 2-core build
machine with --jobs 2, and in under 2 hours on it busy. Measured there (2026-12-02, attribute task 0, one torch
thread) as CPU seconds, the wall time of an idle core (the machine was shared, load average 6-9; wall 1.0-1.9x CPU):
  - a student step (global batch 4, the same whatever N): MimIC 46 ms, w_align = 0 60, MSE only 55, LIVE 60,
    LoRA 100, LoRA† 56, MimIC + LoRA 105, prompt tuning 55, virtual-kv 61: 0.60 s for one step of all 9 methods
    (15 steps/s on average, 9.5 for the slowest); each run adds about 0.5 s of setup and its evaluation 1.2 s;
  - the teacher's store (1,000 queries, 8 shots, top-64 logits) 20 s; zero-shot and 8-shot ICL evaluation 5.5 s.
Per task: 3 sizes x 0.60 s x 1,000 steps + 27 runs x 1.7 s + 26 s = 1,866 s; 4 tasks = 124 min on one core, so
62 min with --jobs 2 (each job a core, two tasks each), about 110 min at today's load.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import time

from pipeline.config import load_config
from pipeline.experiment import (GLOBAL_BATCH, N_TRAIN, _done, _evaluated, _fmt, check_model, checked_family, clocked,
                                 families, map_tasks, plot_vs_n, same_config, stats, sweep_epochs, task_config)
from stages.errors import UserError
from stages.evaluate import _write_json

SHOTS = 8  # the teacher's k, and k-shot ICL's
LOGITS = "topk:64"  # the store keeps the teacher's answer-token distributions, which LIVE trains on
SIZES = (32, 128, 1000)
STEPS = 1000  # optimiser steps of every student, whatever N (see the arithmetic above); exact for N = 32 and 1000
# name (--methods) -> (label, overrides)
METHODS = {
    "mimic": ("MimIC", ()),
    "mimic-ce": ("MimIC, w_align = 0 (CE only)", ("student.w_align=0",)),
    "mse-only": ("MimIC, MSE only (w_ce = 0)", ("student.w_ce=0",)),
    "live": ("LIVE", ("student.method=live",)),
    "lora": ("LoRA (w_align = 0)", ("student.method=lora", "student.w_align=0")),
    "lora-dagger": ("LoRA† (w_align = 0)", ("student.method=lora-dagger", "student.w_align=0")),
    "mimic+lora": ("MimIC + LoRA (joint, fresh heads)", ("student.method=mimic+lora",)),
    "prompt-tuning": ("prompt tuning", ("student.method=prompt-tuning",)),
    "virtual-kv": ("virtual-kv", ("student.method=virtual-kv",)),
}
MARKERS = "osD^v<>px*"


def reads_teacher(method: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether `method`, as run here, trains on what the teacher stored: L_align at a weight above 0, or a KL to the
    teacher's distributions. Without either it reads only the store's queries and answers."""
    from stages.methods import METHODS as IMPLEMENTATIONS
    s = load_config(None, [*extra, *METHODS[method][1]]).student
    losses = IMPLEMENTATIONS[s.method].LOSSES
    return "kl" in losses or ("align" in losses and s.w_align != 0)


def trainable_parameters(student_dpath: str) -> int:
    """The values in a student's artifact (every method saves its trained parameters and nothing else)."""
    from safetensors import safe_open
    total = 0
    for fpath in glob.glob(os.path.join(student_dpath, "*", "*.safetensors")):
        with safe_open(fpath, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def _teacher_seconds(cfg, fpath: str, run: bool) -> float | None:
    """The teacher's wall seconds for cfg's store: those of the run that completed it, timed here, or read back from
    fpath, which keeps them with the config they were timed under. With run, the store is made if it is not complete
    (a no-op if it is); without, only where no time is recorded (see experiment._ceiling on why stores are lazy).
    None where the store was complete before any recorded run (e.g. an experiment directory moved, so the recorded
    config's paths differ): a run that finds the store complete times only its check, which is no teacher's time."""
    from stages import teacher
    recorded = json.load(open(fpath)) if os.path.isfile(fpath) else None
    if recorded is not None and not same_config(recorded["config"], cfg):
        recorded = None
    if run or recorded is None:
        timed = recorded is None and not _complete(cfg.teacher.store)  # a run that will write shards
        t0 = time.monotonic()
        teacher.run(cfg)
        if timed:
            recorded = {"config": cfg.to_dict(), "seconds": round(time.monotonic() - t0, 2)}
            _write_json(fpath, recorded)
    return recorded["seconds"] if recorded is not None else None


def _complete(url: str) -> bool:
    """Whether a complete store is at url (no store there: False)."""
    from storage.errors import StoreError
    from storage.inspection import info
    try:
        return info(url)["complete"]
    except StoreError:
        return False


def _student_seconds(cfg, make_store) -> float | None:
    """Train a student unless done with this config, calling make_store() first. Its wall seconds, timed around
    student.run or read back from wall.json beside its artifact (a resumed student's: those of the run that
    finished it; None where a kill came after the artifact and before its time)."""
    from stages import student
    fpath = os.path.join(cfg.student.out, "wall.json")
    if not _done(cfg.student.out, "method.json", cfg):
        make_store()
        t0 = time.monotonic()
        student.run(cfg)
        _write_json(fpath, {"seconds": round(time.monotonic() - t0, 2)})
    return json.load(open(fpath))["seconds"] if os.path.isfile(fpath) else None


def task_results(u: int, out: str, family: str, methods: tuple[str, ...], sizes: tuple[int, ...], steps: int,
                 num_samples: int, extra: tuple[str, ...], log) -> dict:
    """Task u: {"teacher_s", "zero_shot", "icl", "runs": {method: {N: {accuracy, student_s, parameters,
    train_queries, steps}}}}."""
    fam = families()[family]
    run_dir, cfg = task_config(out, fam, u, num_samples, (f"teacher.shots={SHOTS}", f"teacher.logits={LOGITS}", *extra))
    tag = fam.label(u)
    teacher_fpath = os.path.join(run_dir, "teacher.json")
    # Once per task: teacher.run loads the model before it finds the store complete.
    make_store = functools.cache(lambda: _teacher_seconds(cfg(), teacher_fpath, run=True))

    result = {"zero_shot": _evaluated(cfg("eval.mode=zero-shot"))["vqa_accuracy"],
              "icl": _evaluated(cfg("eval.mode=icl", f"eval.shots={SHOTS}"))["vqa_accuracy"], "runs": {}}
    log(f"{tag}: zero-shot {result['zero_shot']:.1f}, {SHOTS}-shot ICL {result['icl']:.1f}")
    for n in sizes:
        epochs = sweep_epochs(steps, n)
        schedule = (f"student.num_queries={n}", f"student.epochs={epochs}", f"student.global_batch={GLOBAL_BATCH}")
        for method in methods:
            student_dpath = os.path.join(run_dir, f"student-{method}-n{n}")
            overrides = (*METHODS[method][1], *schedule, f"student.out={student_dpath}")
            seconds = _student_seconds(cfg(*overrides), make_store)
            metrics = _evaluated(cfg(*overrides, "eval.mode=trained", f"eval.out={run_dir}/eval-{method}-n{n}"))
            run = {"accuracy": metrics["vqa_accuracy"], "student_s": seconds,
                   "parameters": trainable_parameters(student_dpath),
                   "train_queries": json.load(open(os.path.join(student_dpath, "method.json")))["train_queries"],
                   "steps": epochs * (n // GLOBAL_BATCH)}
            result["runs"].setdefault(method, {})[n] = run
            log(f"{tag}: N={n} {method} {run['accuracy']:.1f} ({seconds} s)")
    result["teacher_s"] = _teacher_seconds(cfg(), teacher_fpath, run=False)
    return result


def summarise(per_task: dict[int, dict], methods: tuple[str, ...], sizes: tuple[int, ...]) -> dict:
    """Over tasks: accuracy's mean and standard error per method and N; the student's seconds per run (every N: the
    same steps) and the teacher's per store; each method's trainable parameters (the same on every task and N)."""
    rows = list(per_task.values())
    summary = {name: stats(r[name] for r in rows) for name in ("zero_shot", "icl")}
    known = [r["teacher_s"] for r in rows if r["teacher_s"] is not None]  # see _teacher_seconds on None
    summary["teacher_s"] = stats(known) if known else None
    for method in methods:
        runs = [r["runs"][method][n] for r in rows for n in sizes]
        summary[method] = {"accuracy": {n: stats(r["runs"][method][n]["accuracy"] for r in rows) for n in sizes},
                           "student_s": stats(run["student_s"] for run in runs if run["student_s"] is not None),
                           "parameters": runs[0]["parameters"]}
    return summary


def table(results: dict) -> str:
    summary, sizes, methods = results["summary"], results["sizes"], results["methods"]
    n_tasks, steps = len(results["tasks"]), sorted({run["steps"] for r in results["per_task"].values()
                                                    for by_n in r["runs"].values() for run in by_n.values()})
    teacher_s = f"{summary['teacher_s']['mean']:.0f}" if summary["teacher_s"] else "—"
    lines = [f"VQA accuracy on the {results['family']} family: mean ± standard error over {n_tasks} tasks, "
             f"{results['num_samples']} test queries each. One {SHOTS}-shot teacher store per task "
             f"({results['n_train']} training queries, teacher.logits={LOGITS}); each student trains on its first N "
             f"queries for {'/'.join(map(str, steps))} optimiser steps of {GLOBAL_BATCH} (the same whatever N, "
             f"but for rounding to whole epochs); {results['minutes']:.0f} min in all ({results['jobs']} jobs, "
             f"{results['cpus']} cores).", "",
             "| method | teacher | trainable parameters | " + " | ".join(f"N = {n}" for n in sizes)
             + " | student s / run | teacher s / store |", "|---|---|---|" + "---|" * len(sizes) + "---|---|"]
    for name, label in (("zero_shot", "zero-shot"), ("icl", f"{SHOTS}-shot ICL")):
        lines.append(f"| {label} | — | 0 | "
                     + " | ".join(_fmt(summary[name]) for _ in sizes) + " | — | — |")
    for method in methods:
        s, teacher = summary[method], results["reads_teacher"][method]
        lines.append(f"| {METHODS[method][0]} | {'yes' if teacher else 'no'} | {s['parameters']:,} | "
                     + " | ".join(_fmt(s["accuracy"][n]) for n in sizes)
                     + f" | {s['student_s']['mean']:.0f} | {teacher_s if teacher else '—'} |")
    lines += ["", "teacher: whether the method trains on what the teacher stored (L_align at a weight above 0, or "
              "LIVE's KL to its answer-token distributions). A teacher-based method pays the teacher's time per store "
              "and the student's per run; a teacher-free one trains here from the same store, but only on its queries "
              "and answers, so it pays the student's time alone. ICL pays no training, but k demonstrations in every "
              "prompt. MimIC + LoRA trains both jointly from fresh heads. Times are wall seconds on this machine, "
              "means over the tasks (and sizes); the teacher's per store "
              + (f"{_fmt(summary['teacher_s'])} s." if summary["teacher_s"] else
                 "not known (every store was complete before a timed teacher run).")]
    return "\n".join(lines) + "\n"


def plot(results: dict, fpath: str) -> None:
    summary, methods = results["summary"], results["methods"]
    spread = [1 + 0.1 * (i / max(1, len(methods) - 1) - 0.5) for i in range(len(methods))]
    lines = [(METHODS[m][0], summary[m]["accuracy"], MARKERS[i % len(MARKERS)], spread[i])
             for i, m in enumerate(methods)]
    plot_vs_n(lines, {f"{SHOTS}-shot ICL": summary["icl"], "zero-shot": summary["zero_shot"]},
              f"N: training queries (one {SHOTS}-shot teacher store per task)", f"{results['family']} family", fpath)


def run(out: str, family: str, tasks: list[int], num_samples: int, methods: tuple[str, ...] = tuple(METHODS),
        sizes: tuple[int, ...] = SIZES, steps: int = STEPS, extra: tuple[str, ...] = (), log=print,
        jobs: int = 1) -> dict:
    checked_family(family, tasks, jobs)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UserError(f"--methods takes some of {', '.join(METHODS)}; got {', '.join(unknown) or 'none'}")
    n_train = load_config(None, [f"task.num_queries={N_TRAIN}", *extra]).task.num_queries
    if not sizes or any(not GLOBAL_BATCH <= n <= n_train for n in sizes) or steps < 1:
        raise UserError(f"training-set sizes must be in {GLOBAL_BATCH}..{n_train} (a global batch to the store's "
                        f"queries) and the steps at least 1; got {list(sizes)}, {steps} steps")
    check_model(out, extra)
    with clocked(out) as total:
        per_task = map_tasks(task_results, tasks, jobs, (out, family, methods, sizes, steps, num_samples, extra), log)
        minutes = total()
    results = {"family": family, "tasks": tasks, "labels": {u: families()[family].label(u) for u in tasks},
               "methods": list(methods), "sizes": list(sizes), "steps": steps, "n_train": n_train,
               "num_samples": num_samples, "overrides": list(extra), "jobs": jobs, "cpus": os.cpu_count(),
               "minutes": round(minutes, 1),
               "reads_teacher": {m: reads_teacher(m, extra) for m in methods},
               "summary": summarise(per_task, methods, sizes), "per_task": per_task}
    _write_json(os.path.join(out, "results.json"), results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(results))
    plot(results, os.path.join(out, "accuracy_vs_n.png"))
    return results
