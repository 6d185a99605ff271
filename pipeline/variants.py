"""The variants experiment (issue 17): the seed's Tab. 8, 11 and 12 from one teacher store.

    teacher(k) -> students: MimIC, its shift and μ ablations (Tab. 8); LoRA and LoRA† with and without L_align,
                and LIVE (Tab. 11); MimIC + LoRA one epoch on top of the MimIC heads (Tab. 12)
               -> eval: zero-shot, k-shot ICL, each student (--mode trained)
               -> L2 to k-shot ICL per layer (Tab. 11, stages/analyze.py)

Every step is a stage's own `run(cfg)` on the pipeline's defaults plus --set style overrides (the embedded
default unless they say otherwise), and a step whose output is complete with the same config is not redone
(pipeline/experiment.py's rule), so a killed run resumes. Writes results.md and results.json.
"""
from __future__ import annotations

import functools
import json
import os

from pipeline.config import load_config
from pipeline.defaults import resolve
from pipeline.experiment import _done, _evaluated, check_model, checked_family, clocked, task_config

SHOTS = 8
# name -> overrides. The authors' LoRA config trains on L_gt alone (w_align 0): Tab. 12's LoRA and Tab. 11's
# "without L_align" rows; Tab. 12's MimIC + LoRA is one epoch on top of the trained MimIC heads.
STUDENTS = {
    "mimic": (),
    "linear": ("student.shift=linear",),
    "vector": ("student.shift=vector",),
    "mu_shared": ("student.mu=shared",),
    "mu_constant": ("student.mu=constant",),
    "lora": ("student.method=lora", "student.w_align=0"),
    "lora_dagger": ("student.method=lora-dagger", "student.w_align=0"),
    "lora_align": ("student.method=lora",),
    "lora_dagger_align": ("student.method=lora-dagger",),
    "mimic_lora": ("student.method=mimic+lora", "student.heads_from={mimic}/heads", "student.epochs=1"),
    "live": ("student.method=live",),
}
LOGITS = "topk:64"  # the store keeps the teacher's answer-token distributions for LIVE (teacher.logits)
TABLES = {  # title -> [(row label, student or baseline)]
    "Tab. 8: implementations of the shift vector, and the μ ablations (accuracy)": [
        ("Linear layer", "linear"), ("Learnable vector", "vector"), ("MimIC", "mimic"),
        ("μ shared across a layer's heads", "mu_shared"), ("μ independent of the query", "mu_constant")],
    "Tab. 11: mean L2 distance to k-shot ICL over layers (lower is closer), and accuracy": [
        ("Zero-shot", "zero-shot"), ("without L_align: LoRA†", "lora_dagger"), ("without L_align: LoRA", "lora"),
        ("with L_align: LoRA†", "lora_dagger_align"), ("with L_align: LoRA", "lora_align"),
        ("with L_align: MimIC", "mimic"), ("LIVE (KL to the teacher's answer tokens)", "live")],
    "Tab. 12: MimIC integrated with LoRA (accuracy)": [
        ("LoRA", "lora"), ("MimIC", "mimic"), ("MimIC + LoRA (1 epoch on the MimIC heads)", "mimic_lora")],
}
L2_RUNS = ("lora_dagger", "lora", "lora_dagger_align", "lora_align", "mimic", "live")


def run(out: str, extra: tuple[str, ...], log, family: str = "", task: int = 0) -> dict:
    """family "": the embedded default (or what extra sets); else task `task` of that toy family, with the data and
    settings of `pipeline experiment toy-icl` (its 1,000 training queries, the cover sampler, 64 test queries)."""
    check_model(out, extra)
    with clocked(out) as total:
        return _run(out, extra, log, total, family, task)


def _run(out: str, extra: tuple[str, ...], log, total, family: str, task: int) -> dict:
    from stages import analyze, student, teacher
    base = (f"teacher.shots={SHOTS}", f"teacher.logits={LOGITS}", *extra, f"run_dir={out}")
    if family:
        _, cfg = task_config(out, checked_family(family, [task], 1), task, 64, base)
    else:
        def cfg(*overrides):
            return resolve(load_config(None, [*base, *overrides]))

    # Once: teacher.run loads the model before it finds the store complete; lazy, as in experiment._ceiling.
    make_store = functools.cache(lambda: teacher.run(cfg()))
    accuracy = {"zero-shot": _evaluated(cfg("eval.mode=zero-shot")), "icl": _evaluated(cfg("eval.mode=icl", f"eval.shots={SHOTS}"))}
    runs = {}
    for name, overrides in STUDENTS.items():
        runs[name] = os.path.join(out, f"student-{name}")
        run_cfg = cfg(*(o.format(**runs) for o in overrides), f"student.out={runs[name]}")
        if not _done(runs[name], "method.json", run_cfg):
            make_store()
            student.run(run_cfg)
        accuracy[name] = _evaluated(cfg("eval.mode=trained", f"eval.student={runs[name]}"))
        log(f"{name}: {json.dumps(accuracy[name])}")
    l2_dpath = os.path.join(out, "l2")
    l2 = (json.load(open(os.path.join(l2_dpath, "l2.json"))) if os.path.isfile(os.path.join(l2_dpath, "l2.json"))
          else analyze.l2(cfg(), [runs[name] for name in L2_RUNS], l2_dpath))
    mean_l2 = {"zero-shot": _mean(l2["l2_per_layer"]["zero-shot"])}
    for label, values in l2["l2_per_layer"].items():
        if (run := l2["runs"][label]) is not None:
            mean_l2[next(n for n, d in runs.items() if d == run)] = _mean(values)
    metric = next(m for m in ("vqa_accuracy", "cider", "accuracy") if m in accuracy["zero-shot"])
    results = {"shots": SHOTS, "family": family, "task": task if family else None, "metric": metric, "accuracy": {k: v[metric] for k, v in accuracy.items()},
               "mean_l2": mean_l2, "l2_per_layer": l2["l2_per_layer"], "overrides": list(extra),
               "minutes": round(total(), 1)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def markdown(results: dict) -> str:
    acc, l2 = results["accuracy"], results["mean_l2"]
    where = f"{results['family']} family, task {results['task']}; " if results.get("family") else ""
    lines = [f"{where}{results['metric']}: zero-shot {acc['zero-shot']:.1f}, {results['shots']}-shot ICL "
             f"{acc['icl']:.1f}; {results['minutes']:.0f} min"]
    for title, rows in TABLES.items():
        with_l2 = title.startswith("Tab. 11")
        lines += ["", title, "", "| method | " + ("L2 | " if with_l2 else "") + f"{results['metric']} |",
                  "|---|" + ("---|" if with_l2 else "") + "---|"]
        for label, key in rows:
            lines.append(f"| {label} | " + (f"{l2[key]:.2f} | " if with_l2 else "") + f"{acc[key]:.1f} |")
    return "\n".join(lines) + "\n"
