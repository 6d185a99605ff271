"""The toy-ICL experiment (issue 8): does MimIC make a zero-shot prompt do what k-shot ICL does?

On each held-out permutation task p of stages/tasks/toy_icl.py, with the trained toy model:

    data(p) -> eval zero-shot, eval k-shot ICL (k in ICL_SHOTS)
            -> for k in TEACHER_SHOTS: teacher(k) -> students (MSE + CE, MSE only, CE only) -> eval MimIC
                                       teacher(k) aligned after SA -> the MSE-only ceiling (mse_ceiling.py)

Every step is a stage's own `run(cfg)`, on a config made of the pipeline's defaults and --set style
overrides, exactly what the CLI commands would run. A step whose output is complete is not redone, so
a killed experiment resumes where it stopped. The results (per permutation and the means) go to
results.json, a Markdown table to results.md and the accuracy-against-k plot to accuracy_vs_k.png.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

from pipeline.config import load_config
from pipeline.defaults import resolve
from stages.errors import UserError

N_TRAIN = 1000  # training queries per task, as in the paper's headline table (METHOD.md §7)
TEACHER_SHOTS = (8, 16)
ICL_SHOTS = (1, 2, 4, 8, 16, 32)
# The student's three losses: both terms with the defaults (METHOD.md §4), and each half alone.
STUDENTS = {"mimic": (), "mse_only": ("student.w_ce=0",), "ce_only": ("student.w_align=0",)}
PATCHED = ("patched_teacher", "patched_ceiling")  # first-answer-token accuracy on the training queries
LABELS = {"zero_shot": "zero-shot", "icl": "k-shot ICL", "mimic": "MimIC (MSE + CE)",
          "mse_only": "MimIC, MSE only", "ce_only": "MimIC, CE only", "patched_ceiling": "MSE-only ceiling"}


def _done(out_dpath: str, result_fname: str, cfg) -> bool:
    """Whether a step already wrote its result in out_dpath, with this same config."""
    config_fpath = os.path.join(out_dpath, "config.json")
    return (os.path.isfile(os.path.join(out_dpath, result_fname)) and os.path.isfile(config_fpath)
            and json.load(open(config_fpath)) == cfg.to_dict())


def _evaluated(cfg) -> dict:
    """Evaluate, or read the metrics of an evaluation already done with this same config."""
    from stages import evaluate
    if _done(cfg.eval.out, "metrics.json", cfg):
        return json.load(open(os.path.join(cfg.eval.out, "metrics.json")))
    return evaluate.run(cfg)


def _ceiling(cfg, out_dpath: str) -> dict:
    """The MSE-only ceiling on cfg's after-SA store, or the one already measured with this same config."""
    from pipeline import mse_ceiling
    if _done(out_dpath, "ceiling.json", cfg):
        return json.load(open(os.path.join(out_dpath, "ceiling.json")))
    patched = mse_ceiling.run(cfg)
    os.makedirs(out_dpath, exist_ok=True)
    if os.path.exists(os.path.join(out_dpath, "ceiling.json")):  # never beside another config than its own
        os.remove(os.path.join(out_dpath, "ceiling.json"))
    for fname, obj in (("config.json", cfg.to_dict()), ("ceiling.json", patched)):  # the result last
        with open(os.path.join(out_dpath, fname + ".tmp"), "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(os.path.join(out_dpath, fname + ".tmp"), os.path.join(out_dpath, fname))
    return patched


def permutation_results(out: str, p: int, num_samples: int, extra: tuple[str, ...], log) -> dict:
    """Accuracy of every method on held-out permutation p: {"zero_shot": a, "icl": {k: a}, name: {k: a}}."""
    from stages import student, teacher
    from stages.tasks.toy_icl import model_dpath, write_toy_icl

    root, run_dir = os.path.join(out, "data", f"perm{p}"), os.path.join(out, f"perm{p}")
    write_toy_icl(root, permutation_seed=p, n_train=N_TRAIN)  # a no-op once complete
    base = (f"model.path={model_dpath()}", f"task.root={root}", f"run_dir={run_dir}", "teacher.sampler=cover",
            "eval.sampler=cover", f"eval.num_samples={num_samples}", *extra)

    def cfg(*overrides):
        return resolve(load_config(None, [*base, *overrides]))

    def accuracy(*overrides) -> float:
        return _evaluated(cfg(*overrides))["vqa_accuracy"]

    result = {"zero_shot": accuracy("eval.mode=zero-shot"), "icl": {}}
    for k in ICL_SHOTS:
        result["icl"][k] = accuracy("eval.mode=icl", f"eval.shots={k}")
        log(f"perm {p}: ICL k={k} {result['icl'][k]:.1f} (zero-shot {result['zero_shot']:.1f})")
    for k in TEACHER_SHOTS:
        teacher.run(cfg(f"teacher.shots={k}"))
        # How far an MSE-only student could get at all: a teacher aligned after SA, patched in (mse_ceiling.py).
        after_sa = cfg(f"teacher.shots={k}", "teacher.capture=attn", f"teacher.store={run_dir}/store-attn-{k}shot")
        teacher.run(after_sa)
        patched = _ceiling(after_sa, os.path.join(run_dir, f"ceiling-{k}shot"))
        result.setdefault("patched_teacher", {})[k] = patched["teacher"]
        result.setdefault("patched_ceiling", {})[k] = patched["ceiling"]
        log(f"perm {p}: {k}-shot teacher patched in {result['patched_teacher'][k]:.1f}, "
            f"its per-answer mean (the MSE-only ceiling) {result['patched_ceiling'][k]:.1f}")
        for name, overrides in STUDENTS.items():
            if name == "ce_only" and k != TEACHER_SHOTS[0]:
                # Without L_align the targets are never read: the heads are the same for every k.
                result[name][k] = result[name][TEACHER_SHOTS[0]]
                continue
            out_dpath = os.path.join(run_dir, f"student-{name}-{k}shot")
            run_cfg = cfg(f"teacher.shots={k}", f"student.out={out_dpath}", *overrides)
            if not _done(out_dpath, os.path.join("heads", "heads.safetensors"), run_cfg):
                student.run(run_cfg)
            result.setdefault(name, {})[k] = accuracy(
                f"teacher.shots={k}", "eval.mode=mimic", f"eval.heads={out_dpath}/heads",
                f"eval.out={run_dir}/eval-mimic-{name}-{k}shot")
            log(f"perm {p}: {name} from the {k}-shot teacher {result[name][k]:.1f}")
    return result


def summarise(per_perm: dict[int, dict]) -> dict:
    """Mean and standard error over permutations of each method at each k."""
    def stats(values):
        values = list(values)
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        return {"mean": statistics.fmean(values), "se": se}
    rows = list(per_perm.values())
    summary = {"zero_shot": stats(r["zero_shot"] for r in rows)}
    for name in ("icl", *STUDENTS, *PATCHED):
        summary[name] = {k: stats(r[name][k] for r in rows) for k in rows[0][name]}
    return summary


def table(summary: dict, n_perms: int, n_queries: int, minutes: float) -> str:
    ks = TEACHER_SHOTS
    fmt = lambda s: f"{s['mean']:.1f} ± {s['se']:.1f}"  # noqa: E731
    lines = [f"VQA accuracy on held-out tasks: mean ± standard error over {n_perms} permutations, "
             f"{n_queries} test queries in all; {N_TRAIN} training queries per task; demonstrations by the cover "
             f"sampler; {minutes:.0f} min.", "",
             "| method | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks),
             f"| zero-shot | " + " | ".join(fmt(summary["zero_shot"]) for _ in ks) + " |"]
    for name in ("icl", *STUDENTS):
        lines.append(f"| {LABELS[name]} | " + " | ".join(fmt(summary[name][k]) for k in ks) + " |")
    ceiling = summary["patched_ceiling"]
    lines.append(f"| {LABELS['patched_ceiling']} (see below) | " + " | ".join(fmt(ceiling[k]) for k in ks) + " |")
    lines += ["", "MimIC rows: heads trained from the k-shot teacher's store and evaluated zero-shot "
              "([BOS] + query, heads on). CE only never reads the store, so one run serves both columns.", "",
              "MSE-only ceiling: the answer of a student at the lowest L_align it can reach, aligned after "
              "self-attention. Every layer's attention output on the zero-shot span is replaced by the k-shot "
              "teacher's, averaged over the training queries with the same answer (what a student that sees "
              "only the query can best match); the number is first-answer-token accuracy on the training queries. "
              "Replacing them with each query's own teacher outputs gives "
              + " and ".join(f"{fmt(summary['patched_teacher'][k])} (k = {k})" for k in ks)
              + " on the same measure, the teacher's own accuracy (pipeline/mse_ceiling.py)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, fpath: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(summary["icl"], key=int)
    ax.errorbar([0, *map(int, ks)], [summary["zero_shot"]["mean"], *(summary["icl"][k]["mean"] for k in ks)],
                yerr=[summary["zero_shot"]["se"], *(summary["icl"][k]["se"] for k in ks)],
                marker="o", label="k-shot ICL (k = 0: zero-shot)")
    for name, marker, nudge in (("mimic", "s", 0.94), ("mse_only", "^", 1.0), ("ce_only", "v", 1.06),
                                ("patched_ceiling", "x", 1.03)):
        tks = sorted(summary[name], key=int)  # nudged sideways so that equal values stay visible
        ax.errorbar([int(k) * nudge for k in tks], [summary[name][k]["mean"] for k in tks],
                    yerr=[summary[name][k]["se"] for k in tks], marker=marker, linestyle="none",
                    label=f"{LABELS[name]} (zero-shot prompt)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, *map(int, ks)], labels=["0", *map(str, ks)])
    ax.set_xlabel("k: demonstrations (ICL) or the teacher's shots (MimIC)")
    ax.set_ylabel("VQA accuracy")
    ax.set_ylim(0, 104)  # room for markers at 100
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)


def _worker(out: str, p: int, num_samples: int, extra: tuple[str, ...], threads: int) -> dict:
    """One permutation in a process of its own (--jobs), with its share of the cores."""
    import torch
    torch.set_num_threads(threads)
    return permutation_results(out, p, num_samples, extra, print)


def run(out: str, permutations: list[int], num_samples: int, extra: tuple[str, ...] = (), log=print,
        jobs: int = 1) -> dict:
    from stages.tasks.toy_icl import N_HELD_OUT
    outside = [p for p in permutations if not 0 <= p < N_HELD_OUT]
    if not permutations or outside:
        raise UserError(f"permutations must be held-out task seeds in 0..{N_HELD_OUT - 1}; got "
                        f"{'none' if not permutations else f'{len(outside)} outside, e.g. {outside[0]}'}")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1; got {jobs}")
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    if jobs == 1:
        per_perm = {p: permutation_results(out, p, num_samples, extra, log) for p in permutations}
    else:  # permutations are independent: each job runs whole permutations (its own stores, students, evals)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {p: pool.submit(_worker, out, p, num_samples, extra, threads) for p in permutations}
            per_perm = {p: f.result() for p, f in futures.items()}
    minutes = (time.monotonic() - t0) / 60
    summary = summarise(per_perm)
    n_queries = num_samples * len(permutations)
    results = {"permutations": permutations, "num_samples": num_samples, "overrides": list(extra), "jobs": jobs,
               "cpus": os.cpu_count(), "minutes": round(minutes, 1), "summary": summary, "per_permutation": per_perm}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(summary, len(permutations), n_queries, minutes))
    plot(summary, os.path.join(out, "accuracy_vs_k.png"))
    return results
