"""`pipeline experiment compare` (issue 20) end to end on a tiny grid: one teacher store per task serves every method
and size, each student trains on the store's first N queries for the same number of steps, the table and
results.json hold every (method, N) cell with its time, and a rerun redoes nothing."""
import glob
import json
import os
import re
import shutil
import statistics

METHODS = ("mimic", "mimic+lora", "virtual-kv")
SIZES = (8, 16)
STEPS = 4


def _row(table: str, label: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"one row {label!r} in:\n{table}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def _artifact_mtimes(task_dpath: str) -> dict[str, int]:
    """What a rerun must leave alone: the students' artifacts, the store's shards and the evaluations."""
    paths = [*glob.glob(os.path.join(task_dpath, "student-*", "*", "*.safetensors")),
             *glob.glob(os.path.join(task_dpath, "store-*", "shards", "**"), recursive=True),
             *glob.glob(os.path.join(task_dpath, "eval-*", "metrics.json"))]
    return {p: os.stat(p).st_mtime_ns for p in paths if os.path.isfile(p)}


def test_compare_runs_every_method_and_size_from_one_store_and_resumes(pipeline, tmp_path, one_thread):
    out = tmp_path / "cmp"
    command = ("experiment", "compare", "--tasks", 1, "--sizes", ",".join(map(str, SIZES)), "--steps", STEPS,
               "--methods", ",".join(METHODS), "--num-samples", 8, "--out", out,
               "--set", "task.num_queries=24", "--set", "teacher.shard_size=8")
    code, stdout, stderr = pipeline(*command)
    assert code == 0, stderr
    task = out / "attribute0"

    # One teacher store for the task, whatever the methods and sizes, made by one teacher run (each run loads the
    # model, even on a complete store).
    stores = [d for d in os.listdir(task) if os.path.isfile(task / d / "manifest.json")]
    assert stores == ["store-vqav2-8shot"], sorted(os.listdir(task))
    assert stdout.count("shards to write") == 1, stdout

    # Each student: the store's first N queries, the same number of optimiser steps whatever N.
    for method in METHODS:
        for n in SIZES:
            student = task / f"student-{method}-n{n}"
            assert json.load(open(student / "method.json"))["train_queries"] == n, student
            assert json.load(open(student / "config.json"))["student"]["num_queries"] == n
            assert len(open(student / "losses.jsonl").readlines()) == STEPS, student

    # results.json: every (method, N) cell, with the accuracy its evaluation measured.
    results = json.load(open(out / "results.json"))
    first_seconds = json.load(open(out / "wall.json"))["seconds"]
    runs = results["per_task"]["0"]["runs"]
    assert set(runs) == set(METHODS) and all(set(runs[m]) == {str(n) for n in SIZES} for m in METHODS), runs
    for method in METHODS:
        for n in SIZES:
            measured = json.load(open(task / f"eval-{method}-n{n}" / "metrics.json"))["vqa_accuracy"]
            assert runs[method][str(n)]["accuracy"] == measured
            assert results["summary"][method]["accuracy"][str(n)]["mean"] == measured
            assert runs[method][str(n)]["student_s"] > 0

    # The table: per method whether it reads the teacher (by hand: MimIC and joint MimIC + LoRA train on L_align at
    # w_align 1; virtual-kv on L_gt alone), its trainable parameters as the student counted them, its accuracy per
    # N, the student's mean seconds per run and, for a teacher-based method, the teacher's per store.
    counted = {method: count for count, method in re.findall(r"student: ([\d,]+) trainable parameters \(([\w+-]+):",
                                                             stdout)}
    teacher_s = json.load(open(task / "teacher.json"))["seconds"]
    table = open(out / "results.md").read()
    for method, label, reads in (("mimic", "MimIC", "yes"), ("mimic+lora", "MimIC + LoRA (joint, fresh heads)", "yes"),
                                 ("virtual-kv", "virtual-kv", "no")):
        seconds = [json.load(open(task / f"student-{method}-n{n}" / "wall.json"))["seconds"] for n in SIZES]
        accuracies = [f"{runs[method][str(n)]['accuracy']:.1f} ± nan" for n in SIZES]  # one task: no standard error
        assert _row(table, label) == [label, reads, counted[method], *accuracies, f"{statistics.fmean(seconds):.0f}",
                                      f"{teacher_s:.0f}" if reads == "yes" else "—"]
    zero_shot = json.load(open(task / "eval-zero-shot-vqav2" / "metrics.json"))["vqa_accuracy"]
    assert _row(table, "zero-shot")[3:5] == [f"{zero_shot:.1f} ± nan"] * 2
    assert os.path.isfile(out / "accuracy_vs_n.png")

    # A rerun trains, evaluates and stores nothing again, and reports the times it read back.
    before = _artifact_mtimes(str(task))
    assert sum("student-" in p for p in before) >= len(METHODS) * len(SIZES) and any("shards" in p for p in before)
    code, stdout, stderr = pipeline(*command)
    assert code == 0, stderr
    assert _artifact_mtimes(str(task)) == before
    assert not re.search(r"student: [\d,]+ trainable parameters", stdout), stdout  # no student started
    assert "shards to write" not in stdout, stdout  # nor the teacher: no result needs its store
    rerun = json.load(open(out / "results.json"))
    assert rerun["per_task"] == results["per_task"]

    # Without its store and checkpoints (what .gitignore keeps out of bench/ experiments), the same: nothing
    # is rebuilt, and every number, the teacher's time included, is read back.
    shutil.rmtree(task / "store-vqav2-8shot")
    for student in glob.glob(str(task / "student-*")):
        shutil.rmtree(os.path.join(student, "checkpoints"))
    before = _artifact_mtimes(str(task))
    code, stdout, stderr = pipeline(*command)
    assert code == 0, stderr
    assert _artifact_mtimes(str(task)) == before and not os.path.exists(task / "store-vqav2-8shot")
    assert json.load(open(out / "results.json"))["per_task"] == results["per_task"]
    assert json.load(open(out / "wall.json"))["seconds"] > first_seconds  # the three runs' time, summed


def test_teacher_time_is_recorded_only_from_a_run_that_made_the_store(tmp_path, monkeypatch):
    """A teacher run that finds its store complete times only its check: that is recorded nowhere and reported as
    unknown (None); a run that builds the store is timed and recorded, and read back while the config is the same."""
    from pipeline.compare import _teacher_seconds
    from pipeline.config import load_config
    from stages import teacher
    from tests.test_storage import make_manifest, write_store

    calls = []
    def fake_run(cfg):  # the teacher: builds the store when it is not there; 1.5 s either way
        calls.append(cfg.teacher.store)
        if not os.path.isdir(cfg.teacher.store):
            write_store(cfg.teacher.store, make_manifest())
        clock[0] += 1.5
    clock = [100.0]
    monkeypatch.setattr(teacher, "run", fake_run)
    monkeypatch.setattr("pipeline.compare.time.monotonic", lambda: clock[0])
    fpath = str(tmp_path / "teacher.json")

    cfg = load_config(None, [f"teacher.store={tmp_path / 'store'}"])
    assert _teacher_seconds(cfg, fpath, run=True) == 1.5  # built here: timed and recorded
    assert json.load(open(fpath))["seconds"] == 1.5
    assert _teacher_seconds(cfg, fpath, run=False) == 1.5 and len(calls) == 1  # read back, no run

    # The same complete store under another config (a moved directory changes its paths): the run only checks it.
    moved = load_config(None, [f"teacher.store={tmp_path / 'store'}", f"student.out={tmp_path / 'elsewhere'}"])
    assert _teacher_seconds(moved, fpath, run=True) is None and len(calls) == 2
    assert json.load(open(fpath))["config"] == cfg.to_dict()  # the record of the run that built it, kept
