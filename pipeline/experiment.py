"""The toy-ICL experiment (issues 8 and 15): does MimIC make a zero-shot prompt do what k-shot ICL does?

Two task families, both with the trained toy model (stages/models/toy_icl) and both in the VQAv2 format:
lookup (stages/tasks/toy_icl.py: the demonstrations say which word each colour stands for, a per-query
lookup) and attribute (stages/tasks/toy_attribute.py: they say which attribute of the image is asked,
the same for every query). On each task u of a family:

    data(u) -> eval zero-shot, eval k-shot ICL (k in ICL_SHOTS)
            -> for k in TEACHER_SHOTS: teacher(k) -> students (MSE + CE, the same with CE on the answer only,
                                       MSE only, CE only) -> eval MimIC
                                       teacher(k) aligned after SA -> the MSE-only ceiling (mse_ceiling.py)
            -> for N in the sweep: teacher(SWEEP_SHOTS, first N queries) -> the three students, SWEEP_STEPS
               optimiser steps whatever N -> eval MimIC

Demonstrations come from the whole training split (task.support=train), so a small N keeps the pool
that a large one has. Every step is a stage's own `run(cfg)`, on a config made of the pipeline's defaults
and --set style overrides, exactly what the CLI commands would run. A step whose output is complete is
not redone, so a killed experiment resumes where it stopped. The results (per task and the means) go to
results.json, Markdown tables to results.md, and the plots to accuracy_vs_k.png and accuracy_vs_n.png.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.config import load_config
from pipeline.defaults import resolve
from stages.errors import UserError

N_TRAIN = 1000  # training queries per task, as in the paper's headline table (METHOD.md §7)
TEACHER_SHOTS = (8, 16)
ICL_SHOTS = (1, 2, 4, 8, 16, 32)
# The student's losses: both terms with the defaults (METHOD.md §4), and each half alone; and both terms with L_gt
# on the answer tokens only, where the authors take it on every span token (on the attribute family's colour
# tasks that scope decides whether MimIC reaches ICL: README). The sweep trains the first three.
STUDENTS = {"mimic": (), "mimic_answer": ("student.ce_on=answer",), "mse_only": ("student.w_ce=0",),
            "ce_only": ("student.w_align=0",)}
SWEEP_STUDENTS = ("mimic", "mse_only", "ce_only")
PATCHED = ("patched_teacher", "patched_ceiling")  # first-answer-token accuracy on the training queries
LABELS = {"zero_shot": "zero-shot", "icl": "k-shot ICL", "mimic": "MimIC (MSE + CE)",
          "mimic_answer": "MimIC (MSE + CE on the answer only)",
          "mse_only": "MimIC, MSE only", "ce_only": "MimIC, CE only", "patched_ceiling": "MSE-only ceiling"}
SWEEP_SIZES = (16, 32, 128, 1000)
SWEEP_SHOTS = 8
# The paper's rule for 1,000 samples (5 epochs of 250 steps at the global batch of 4), for every N.
SWEEP_STEPS = 1250
GLOBAL_BATCH = 4


@dataclass(frozen=True)
class Family:
    """A toy task family: how task u's data set is written, what it is called, and how its ceiling is measured.

    ceiling_views = 1: the MSE-only optimum is taken as the mean over the training queries with the same
    answer (a lookup query is its colour, so those are the other demonstration draws of the same query);
    V > 1: as the mean over V demonstration draws of each query's own teacher outputs, on the first
    ceiling_queries training queries (teacher.views = V).
    """

    name: str
    unit: str                                # a task u in the tables' words
    write: Callable[[str, int, int], None]   # (root, u, n_train)
    label: Callable[[int], str]
    ceiling_views: int
    ceiling_queries: int
    n_tasks: int | None                      # tasks there are (None: any number of seeds)
    default_tasks: int                       # tasks of the committed tables: at least 8, each task alike


def _write_lookup(root: str, u: int, n_train: int) -> None:
    from stages.tasks.toy_icl import write_toy_icl
    write_toy_icl(root, permutation_seed=u, n_train=n_train)


def _write_attribute(root: str, u: int, n_train: int) -> None:
    from stages.tasks.toy_attribute import TASKS, write_toy_attribute
    write_toy_attribute(root, u % len(TASKS), n_train=n_train, seed=u // len(TASKS))


def _attribute_label(u: int) -> str:
    from stages.tasks.toy_attribute import TASKS
    return f"{TASKS[u % len(TASKS)]}, seed {u // len(TASKS)}"


def families() -> dict[str, Family]:
    from stages.tasks.toy_icl import N_HELD_OUT
    from stages.tasks.toy_attribute import TASKS
    return {"lookup": Family("lookup", "held-out permutations", _write_lookup, lambda u: f"permutation {u}",
                             1, N_TRAIN, N_HELD_OUT, 8),
            "attribute": Family("attribute", f"attribute tasks (the {len(TASKS)} attributes in turn, then again with "
                                "the next data seed)", _write_attribute, _attribute_label, 8, 128, None,
                                3 * len(TASKS))}


def _portable(config: dict) -> dict:
    """config with the shipped model named by its place in the package, not on this disk.

    Configs hold absolute model paths; the committed results in bench/ were made in one checkout and must
    still count as done in another (any other model path is compared as it is)."""
    from stages.tasks.toy_icl import model_dpath
    shipped = os.path.join("stages", "models", os.path.basename(model_dpath()))
    if os.path.normpath(config["model"]["path"]).endswith(os.sep + shipped):
        config = {**config, "model": {**config["model"], "path": "<package>/" + shipped.replace(os.sep, "/")}}
    return config


def same_config(recorded: dict, cfg) -> bool:
    """Whether a result recorded with config `recorded` was made with cfg (see _portable)."""
    return _portable(recorded) == _portable(cfg.to_dict())


def _done(out_dpath: str, result_fname: str, cfg) -> bool:
    """Whether a step already wrote its result in out_dpath, with this same config."""
    config_fpath = os.path.join(out_dpath, "config.json")
    return (os.path.isfile(os.path.join(out_dpath, result_fname)) and os.path.isfile(config_fpath)
            and same_config(json.load(open(config_fpath)), cfg))


def _evaluated(cfg) -> dict:
    """Evaluate, or read the metrics of an evaluation already done with this same config."""
    from stages import evaluate
    if _done(cfg.eval.out, "metrics.json", cfg):
        return json.load(open(os.path.join(cfg.eval.out, "metrics.json")))
    return evaluate.run(cfg)


def _ceiling(cfg, out_dpath: str) -> dict:
    """The MSE-only ceiling on cfg's after-SA store, or the one already measured with this same config.

    The store is made here, only when a result still needs it, and so are the students' (task_results): the
    small results (evaluations, ceilings, trained heads) can travel to another machine without the stores and
    the experiment goes on there, rebuilding no store whose results are all in."""
    from pipeline import mse_ceiling
    from stages import teacher
    from stages.evaluate import _write_json
    if _done(out_dpath, "ceiling.json", cfg):
        return json.load(open(os.path.join(out_dpath, "ceiling.json")))
    teacher.run(cfg)
    patched = mse_ceiling.run(cfg)
    os.makedirs(out_dpath, exist_ok=True)
    if os.path.exists(os.path.join(out_dpath, "ceiling.json")):  # never beside another config than its own
        os.remove(os.path.join(out_dpath, "ceiling.json"))
    for fname, obj in (("config.json", cfg.to_dict()), ("ceiling.json", patched)):  # the result last
        _write_json(os.path.join(out_dpath, fname), obj)
    return patched


def check_model(out: str, extra: tuple[str, ...]) -> None:
    """Refuse to go on in `out` with other model weights than its results were made with.

    Configs name the model by its path, so a retrained toy model would find every result in a committed bench/
    directory done. out/model.json keeps the sha256 of the weights of the first run there."""
    from stages.evaluate import _write_json
    from stages.models.provenance import weights_sha256
    from stages.tasks.toy_icl import model_dpath
    path = load_config(None, list(extra)).model.path or model_dpath()
    digest, fpath = weights_sha256(path), os.path.join(out, "model.json")
    if os.path.isfile(fpath) and (recorded := json.load(open(fpath))["weights_sha256"]) != digest:
        raise UserError(f"{out} holds results of a model with weights sha256 {recorded[:12]}, but {path} has "
                        f"{digest[:12]}; choose another --out, or delete {out} to start over")
    os.makedirs(out, exist_ok=True)
    _write_json(fpath, {"weights_sha256": digest})


@contextlib.contextmanager
def clocked(out: str):
    """Yield total(): the wall minutes spent on the experiment in `out` over every invocation, this one included.

    Kept in out/wall.json (in seconds) and rewritten every 30 s (a kill loses less than that), so an experiment
    resumed later, or on another machine from its small results, reports the whole time it took."""
    from stages.evaluate import _write_json
    fpath = os.path.join(out, "wall.json")
    before = json.load(open(fpath))["seconds"] if os.path.isfile(fpath) else 0.0
    t0, stop = time.monotonic(), threading.Event()

    def seconds() -> float:
        return before + time.monotonic() - t0

    def total() -> float:
        return seconds() / 60

    def save():  # to the millisecond: a resumed run that only reads results back still adds its time
        _write_json(fpath, {"seconds": round(seconds(), 3)})

    def tick():
        while not stop.wait(30):
            save()
    thread = threading.Thread(target=tick, name="experiment-clock", daemon=True)
    thread.start()
    try:
        yield total
    finally:
        stop.set()
        thread.join()
        save()


def task_config(out: str, family: Family, u: int, num_samples: int, extra: tuple[str, ...]):
    """Task u's data set, written under out/data (a no-op once complete); its run directory; and cfg(*overrides),
    the config of one of its steps: N_TRAIN training queries, demonstrations by the cover sampler from the whole
    training split, num_samples test queries, then `extra` and the overrides."""
    from stages.tasks.toy_icl import model_dpath

    name = f"{'perm' if family.name == 'lookup' else family.name}{u}"
    root, run_dir = os.path.join(out, "data", name), os.path.join(out, name)
    family.write(root, u, N_TRAIN)
    base = (f"model.path={model_dpath()}", f"task.root={root}", f"run_dir={run_dir}", "teacher.sampler=cover",
            "eval.sampler=cover", "task.support=train", f"task.num_queries={N_TRAIN}",
            f"eval.num_samples={num_samples}", *extra)

    def cfg(*overrides):
        return resolve(load_config(None, [*base, *overrides]))
    return run_dir, cfg


def sweep_epochs(steps: int, n: int) -> int:
    """Epochs of N queries that make about `steps` optimiser steps of GLOBAL_BATCH (exactly, where they divide)."""
    return max(1, round(steps * GLOBAL_BATCH / n))


def task_results(out: str, family: Family, u: int, num_samples: int, extra: tuple[str, ...], sweep: tuple[int, ...],
                 sweep_steps: int, log) -> dict:
    """Accuracy of every method on task u: {"zero_shot": a, "icl": {k: a}, name: {k: a}, "sweep": {N: {name: a}}}."""
    from stages import student, teacher

    run_dir, cfg = task_config(out, family, u, num_samples, extra)
    tag = family.label(u)

    def accuracy(*overrides) -> float:
        return _evaluated(cfg(*overrides))["vqa_accuracy"]

    # Once per store and task: teacher.run loads the model before it finds a store complete. Here, when a student
    # needs it, not up front: see _ceiling.
    make_store = functools.cache(lambda *store: teacher.run(cfg(*store)))

    def trained(out_dpath: str, store: tuple[str, ...], *overrides) -> float:
        """Train a student on the store that `store` names (unless done with this config) and evaluate it as MimIC."""
        overrides = (*store, *overrides)
        run_cfg = cfg(*overrides, f"student.out={out_dpath}")
        if not _done(out_dpath, os.path.join("heads", "heads.safetensors"), run_cfg):
            make_store(*store)
            student.run(run_cfg)
        eval_dpath = os.path.join(run_dir, os.path.basename(out_dpath).replace("student-", "eval-mimic-", 1))
        return accuracy(*overrides, "eval.mode=mimic", f"eval.heads={out_dpath}/heads", f"eval.out={eval_dpath}")

    n_train = cfg().task.num_queries  # N_TRAIN unless --set task.num_queries says otherwise
    result = {"zero_shot": accuracy("eval.mode=zero-shot"), "icl": {}}
    for k in ICL_SHOTS:
        result["icl"][k] = accuracy("eval.mode=icl", f"eval.shots={k}")
        log(f"{tag}: ICL k={k} {result['icl'][k]:.1f} (zero-shot {result['zero_shot']:.1f})")
    for k in TEACHER_SHOTS:
        # How far an MSE-only student could get at all: a teacher aligned after SA, patched in (mse_ceiling.py).
        after_sa = cfg(f"teacher.shots={k}", "teacher.capture=attn", f"teacher.store={run_dir}/store-attn-{k}shot",
                       f"teacher.views={family.ceiling_views}", f"task.num_queries={min(n_train, family.ceiling_queries)}")
        patched = _ceiling(after_sa, os.path.join(run_dir, f"ceiling-{k}shot"))
        result.setdefault("patched_teacher", {})[k] = patched["teacher"]
        result.setdefault("patched_ceiling", {})[k] = patched["ceiling"]
        log(f"{tag}: {k}-shot teacher patched in {result['patched_teacher'][k]:.1f}, "
            f"its MSE-only optimum (the ceiling) {result['patched_ceiling'][k]:.1f}")
        for method, overrides in STUDENTS.items():
            if method == "ce_only" and k != TEACHER_SHOTS[0]:
                # Without L_align the targets are never read: the heads are the same for every k.
                result[method][k] = result[method][TEACHER_SHOTS[0]]
                continue
            result.setdefault(method, {})[k] = trained(os.path.join(run_dir, f"student-{method}-{k}shot"),
                                                       (f"teacher.shots={k}",), *overrides)
            log(f"{tag}: {method} from the {k}-shot teacher {result[method][k]:.1f}")
    for n in sweep:  # the same number of optimiser steps for every N, so that a small N is not undertrained
        store = [f"teacher.shots={SWEEP_SHOTS}", f"task.num_queries={n}"]
        if n != n_train:  # all training queries: the main table's store
            store.append(f"teacher.store={run_dir}/store-{SWEEP_SHOTS}shot-n{n}")
        epochs = sweep_epochs(sweep_steps, n)
        for method in SWEEP_STUDENTS:
            a = trained(os.path.join(run_dir, f"student-sweep-n{n}-{method}"), tuple(store), *STUDENTS[method],
                        f"student.epochs={epochs}", f"student.global_batch={GLOBAL_BATCH}")
            result.setdefault("sweep", {}).setdefault(n, {})[method] = a
            log(f"{tag}: N={n} {method} {a:.1f}")
    return result


def stats(values) -> dict:
    """Mean and standard error (nan for one value)."""
    values = list(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se}


def summarise(per_task: dict[int, dict]) -> dict:
    """Mean and standard error over tasks of each method at each k (and each N of the sweep)."""
    rows = list(per_task.values())
    summary = {"zero_shot": stats(r["zero_shot"] for r in rows)}
    for name in ("icl", *STUDENTS, *PATCHED):
        summary[name] = {k: stats(r[name][k] for r in rows) for k in rows[0][name]}
    if rows[0].get("sweep"):
        summary["sweep"] = {n: {m: stats(r["sweep"][n][m] for r in rows) for m in SWEEP_STUDENTS} for n in rows[0]["sweep"]}
    return summary


def _fmt(s: dict) -> str:
    return f"{s['mean']:.1f} ± {s['se']:.1f}"


def table(summary: dict, family: Family, n_tasks: int, n_queries: int, sweep_steps: int, minutes: float) -> str:
    ks = TEACHER_SHOTS
    lines = [f"VQA accuracy on the {family.name} family: mean ± standard error over {n_tasks} {family.unit}, "
             f"{n_queries} test queries in all; {N_TRAIN} training queries per task; demonstrations by the cover "
             f"sampler from the whole training split; {minutes:.0f} min.", "",
             "| method | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks),
             "| zero-shot | " + " | ".join(_fmt(summary["zero_shot"]) for _ in ks) + " |"]
    for name in ("icl", *STUDENTS):
        lines.append(f"| {LABELS[name]} | " + " | ".join(_fmt(summary[name][k]) for k in ks) + " |")
    ceiling = summary["patched_ceiling"]
    lines.append(f"| {LABELS['patched_ceiling']} (see below) | " + " | ".join(_fmt(ceiling[k]) for k in ks) + " |")
    if family.ceiling_views == 1:
        optimum = "averaged over the training queries with the same answer (on this family a query is its colour)"
    else:
        optimum = (f"averaged over {family.ceiling_views} demonstration draws of each query's own (teacher.views; "
                   f"on the first {family.ceiling_queries} training queries)")
    lines += ["", "MimIC rows: heads trained from the k-shot teacher's store and evaluated zero-shot "
              "([BOS] + query, heads on). CE only never reads the store, so one run serves both columns.", "",
              "MSE-only ceiling: the answer of a student at the lowest L_align it can reach, aligned after "
              "self-attention. Every layer's attention output on the zero-shot span is replaced by the k-shot "
              f"teacher's, {optimum}: what a student that sees only the query can best match. The number is "
              "first-answer-token accuracy on the training queries. Replacing them with each query's own teacher "
              "outputs gives " + " and ".join(f"{_fmt(summary['patched_teacher'][k])} (k = {k})" for k in ks)
              + " on the same measure, the teacher's own accuracy (pipeline/mse_ceiling.py)."]
    if sweep := summary.get("sweep"):
        lines += ["", f"Training-set size (teacher k = {SWEEP_SHOTS}; {sweep_steps} optimiser steps of "
                  f"{GLOBAL_BATCH} queries whatever N, the demonstrations from the whole training split; "
                  f"k = {SWEEP_SHOTS} ICL {_fmt(summary['icl'][SWEEP_SHOTS])}, zero-shot {_fmt(summary['zero_shot'])}):",
                  "", "| N | " + " | ".join(LABELS[m] for m in SWEEP_STUDENTS) + " |", "|---|" + "---|" * len(SWEEP_STUDENTS)]
        for n in sorted(sweep, key=int):
            lines.append(f"| {n} | " + " | ".join(_fmt(sweep[n][m]) for m in SWEEP_STUDENTS) + " |")
    return "\n".join(lines) + "\n"


MARKERS = {"mimic": ("s", 0.94), "mimic_answer": ("D", 0.97), "mse_only": ("^", 1.0), "ce_only": ("v", 1.06),
           "patched_ceiling": ("x", 1.03)}


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(figsize=(6, 4))


def _finish(plt, fig, ax, fpath: str) -> None:
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_ylim(0, 104)  # room for markers at 100
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)


def plot(summary: dict, family: Family, fpath: str) -> None:
    plt, fig, ax = _figure()
    ks = sorted(summary["icl"], key=int)
    ax.errorbar([0, *map(int, ks)], [summary["zero_shot"]["mean"], *(summary["icl"][k]["mean"] for k in ks)],
                yerr=[summary["zero_shot"]["se"], *(summary["icl"][k]["se"] for k in ks)],
                marker="o", label="k-shot ICL (k = 0: zero-shot)")
    for name, (marker, nudge) in MARKERS.items():
        tks = sorted(summary[name], key=int)  # nudged sideways so that equal values stay visible
        ax.errorbar([int(k) * nudge for k in tks], [summary[name][k]["mean"] for k in tks],
                    yerr=[summary[name][k]["se"] for k in tks], marker=marker, linestyle="none",
                    label=f"{LABELS[name]} (zero-shot prompt)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, *map(int, ks)], labels=["0", *map(str, ks)])
    ax.set_xlabel("k: demonstrations (ICL) or the teacher's shots (MimIC)")
    ax.set_title(f"{family.name} family", fontsize=10)
    _finish(plt, fig, ax, fpath)


def plot_vs_n(lines: list[tuple[str, dict, str, float]], references: dict[str, dict], xlabel: str, title: str,
              fpath: str) -> None:
    """Accuracy against training-set size N: per (label, {N: stats}, marker, nudge) a line with error bars, nudged
    sideways by the factor `nudge` so that equal values stay visible; per reference {label: stats} a grey level."""
    plt, fig, ax = _figure()
    ns = sorted({int(n) for _, values, _, _ in lines for n in values})
    for label, values, marker, nudge in lines:
        ax.errorbar([n * nudge for n in ns], [values[n]["mean"] for n in ns], yerr=[values[n]["se"] for n in ns],
                    marker=marker, label=label)
    for (label, value), style in zip(references.items(), ("--", ":", "-.")):
        ax.axhline(value["mean"], color="grey", linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(ns, labels=[str(n) for n in ns])
    ax.minorticks_off()  # within a decade the log axis would label its minor ticks too
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    _finish(plt, fig, ax, fpath)


def plot_sweep(summary: dict, family: Family, sweep_steps: int, fpath: str) -> None:
    sweep = {int(n): by_method for n, by_method in summary["sweep"].items()}
    plot_vs_n([(LABELS[name], {n: sweep[n][name] for n in sweep}, *MARKERS[name]) for name in SWEEP_STUDENTS],
              {f"k = {SWEEP_SHOTS} ICL": summary["icl"][SWEEP_SHOTS], "zero-shot": summary["zero_shot"]},
              f"N: training queries (teacher k = {SWEEP_SHOTS}, {sweep_steps} optimiser steps each)",
              f"{family.name} family", fpath)


def checked_family(family: str, tasks: list[int], jobs: int) -> Family:
    """The family of that name, if `tasks` are some of its tasks and `jobs` is a number of processes."""
    known = families()
    if family not in known:
        raise UserError(f"unknown task family {family!r}; choose one of {', '.join(known)}")
    fam = known[family]
    outside = [u for u in tasks if u < 0 or (fam.n_tasks is not None and u >= fam.n_tasks)]
    if not tasks or outside:
        raise UserError(f"tasks of the {family} family are numbered 0..{'' if fam.n_tasks is None else fam.n_tasks - 1}; "
                        f"got {'none' if not tasks else f'{len(outside)} outside, e.g. {outside[0]}'}")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1; got {jobs}")
    return fam


def _worker(threads: int, parent: int) -> None:
    """Set up a task process (--jobs): its share of the cores, and its end when the experiment's process ends.
    A killed parent would otherwise leave its workers training on, unseen; what they leave half done is
    redone by the next run, as after any kill."""
    import torch
    torch.set_num_threads(threads)

    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def map_tasks(fn, tasks: list[int], jobs: int, args: tuple, log) -> dict:
    """{u: fn(u, *args, log)} for every task u. Tasks are independent, so with jobs > 1 each of `jobs` processes
    runs whole tasks (their own stores, students, evaluations); then fn and args must pickle, and log is print."""
    if jobs == 1:
        return {u: fn(u, *args, log) for u in tasks}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker,
                             initargs=(threads, os.getpid())) as pool:
        futures = {u: pool.submit(fn, u, *args, print) for u in tasks}
        return {u: f.result() for u, f in futures.items()}


def _family_task(u: int, out: str, family: str, *args) -> dict:
    """task_results by the family's name, which pickles where a Family does not."""
    return task_results(out, families()[family], u, *args)


def run(out: str, family: str, tasks: list[int], num_samples: int, extra: tuple[str, ...] = (), log=print,
        jobs: int = 1, sweep: tuple[int, ...] = SWEEP_SIZES, sweep_steps: int = SWEEP_STEPS) -> dict:
    fam = checked_family(family, tasks, jobs)
    if any(not 0 < n <= N_TRAIN for n in sweep) or sweep_steps < 1:
        raise UserError(f"training-set sizes of the sweep must be in 1..{N_TRAIN} and its steps at least 1; "
                        f"got {list(sweep)}, {sweep_steps} steps")
    check_model(out, extra)
    with clocked(out) as total:
        per_task = map_tasks(_family_task, tasks, jobs, (out, family, num_samples, extra, sweep, sweep_steps), log)
        minutes = total()
    summary = summarise(per_task)
    results = {"family": family, "tasks": tasks, "labels": {u: fam.label(u) for u in tasks},
               "num_samples": num_samples, "overrides": list(extra), "sweep_sizes": list(sweep), "sweep_steps": sweep_steps, "jobs": jobs,
               "cpus": os.cpu_count(), "minutes": round(minutes, 1), "summary": summary, "per_task": per_task}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(summary, fam, len(tasks), num_samples * len(tasks), sweep_steps, minutes))
    plot(summary, fam, os.path.join(out, "accuracy_vs_k.png"))
    if sweep:
        plot_sweep(summary, fam, sweep_steps, os.path.join(out, "accuracy_vs_n.png"))
    return results
