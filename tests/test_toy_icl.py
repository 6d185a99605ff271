"""The toy ICL task and its pretraining script (issue 8): the mechanics only, never emergent ICL.

The data set reads through the VQA loader; training batches equal what stages.models.encode builds;
a short run on tiny settings lowers the loss; the saved model loads through stages.models.load_model.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

from stages.errors import UserError
from stages.models import LoadedModel, idefics2, load_model
from stages.models.encode import encode
from stages.tasks import get_task
from stages.tasks.prompts import build_prompt
from stages.tasks.sample import Sample
from stages.tasks.toy_icl import (COLOURS, N_HELD_OUT, QUESTION, WORDS, anchor_permutation, build_model,
                                  held_out_permutations, model_dpath, permutation, write_toy_icl)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("train_toy_icl", os.path.join(ROOT, "scripts", "train_toy_icl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_written_task_loads_through_the_vqa_loader(tmp_path):
    root = str(tmp_path / "toy")
    write_toy_icl(root, 3, n_train=24, n_val=16)
    write_toy_icl(root, 3, n_train=24, n_val=16)  # complete: a no-op
    perm = permutation(3)
    task = get_task("vqav2")
    train, val = task.load(root, "train"), task.load(root, "val")
    assert len(train) == 24 and len(val) == 16 and not {s.id for s in train} & {s.id for s in val}
    assert Counter(s.answers[0] for s in train) == Counter({WORDS[p]: 3 for p in perm})  # colours balanced
    for s in train[:8]:
        assert s.question == QUESTION and len(s.answers) == 10 and len(set(s.answers)) == 1
        pixels = np.asarray(s.load_image(), np.float64)
        assert pixels.shape == (16, 16, 3) and pixels.std() > 2  # never uniform
        colour = int(np.argmin([np.abs(pixels.mean((0, 1)) - c).sum() for c in COLOURS]))
        assert s.answers[0] == WORDS[perm[colour]]  # the image's colour, mapped by the task
    with pytest.raises(UserError, match="not this toy ICL set"):
        write_toy_icl(root, 4, n_train=24, n_val=16)
    with pytest.raises(UserError, match="not held out"):
        write_toy_icl(str(tmp_path / "other"), N_HELD_OUT)


def test_held_out_tasks_are_distinct_and_the_anchor_is_not_one():
    held_out = held_out_permutations()
    assert len(held_out) == N_HELD_OUT and anchor_permutation() not in held_out


def test_training_batches_equal_the_pipeline_encoding():
    script = _script()
    model, processor = build_model(0)
    idefics2.prepare_processor(processor)
    lm = LoadedModel("idefics2", idefics2, model, processor, "toy")
    images = script.pool_images(3, seed=5)
    pools = script.make_pools(processor, images)
    perm, colours, idx = permutation(0), np.array([[2, 7, 2, 0, 5]]), np.array([[0, 1, 2, 1, 0]])
    batch = script.make_batch(script.Episodes(lm), pools, [tuple(WORDS[perm[c]] for c in colours[0])], colours, idx)

    items = [Sample(str(i), "", QUESTION, (WORDS[perm[c]],)) for i, c in enumerate(colours[0])]
    image_of = {s.id: images[c][j] for s, c, j in zip(items, colours[0], idx[0])}
    prompt = build_prompt("vqa", "icl", items[-1], [(s, s.answers[0]) for s in items[:-1]],
                          answer=items[-1].answers[0], load=lambda s: image_of[s.id])
    enc = encode(lm, [prompt])
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(batch[key], enc.inputs[key].to(batch[key].dtype)), key
    assert batch["n_answers"] == 5


def test_short_training_lowers_the_loss_and_the_model_loads(tmp_path):
    script = _script()
    out, final = str(tmp_path / "run"), str(tmp_path / "model")
    script.main(["--out", out, "--final", final, "--steps", "30", "--batch", "4", "--k-max", "4", "--pool", "8",
                 "--warmup", "1", "--lr", "3e-3", "--eval-every", "1000", "--eval-episodes", "16", "--threads", "1"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert losses[30] < losses[1] - 1.0, losses
    assert log[-1]["final"] and {"k0", "k4", "k8", "k16"} <= set(log[-1])
    lm = load_model(final)
    assert lm.family == "idefics2" and lm.processor.image_seq_len == 4
    assert json.load(open(os.path.join(final, "training.json")))["phases"][-1]["steps"] == 30
    # Rerunning the finished command resumes from its checkpoint and trains no further step.
    script.main(["--out", out, "--final", final, "--steps", "30", "--batch", "4", "--k-max", "4", "--pool", "8",
                 "--warmup", "1", "--lr", "3e-3", "--eval-every", "1000", "--eval-episodes", "16", "--threads", "1"])
    assert json.load(open(os.path.join(final, "training.json")))["phases"][-1]["steps"] == 30


def test_a_step_batch_depends_only_on_seed_and_step_and_never_shows_a_held_out_task():
    script = _script()
    model, processor = build_model(0)
    lm = LoadedModel("idefics2", idefics2, model, processor, "toy")
    eps, pools = script.Episodes(lm), script.make_pools(processor, script.pool_images(4, seed=0))
    args = script.parse_args(["--batch", "8", "--k-max", "8", "--pool", "4"])
    anchor, held_out = anchor_permutation(), held_out_permutations()
    a, b = (script.train_batch(eps, pools, args, 7, anchor, held_out) for _ in range(2))
    assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "pixel_values", "targets"))
    assert not torch.equal(a["input_ids"], script.train_batch(eps, pools, args, 8, anchor, held_out)["input_ids"])
    word_of = {eps.word_ids[w]: i for i, w in enumerate(WORDS)}
    palette = torch.tensor(COLOURS, dtype=torch.float32) / 127.5 - 1  # normalised as the processor does
    for row, means in zip(a["input_ids"], a["pixel_values"].mean((3, 4))):  # means [n_items, 3]
        colours = torch.cdist(means, palette).argmin(-1).tolist()
        words = [word_of[int(t)] for t in row[a["targets"][: a["n_answers"]]]]
        pairs = set(zip(colours, words))
        # One task per episode: a colour always gets the same word, two colours never share one.
        assert len(pairs) == len(set(colours)) == len(set(words))
        if len(pairs) == len(COLOURS):
            assert tuple(w for _, w in sorted(pairs)) not in held_out


def test_committed_toy_model_learns_in_context_through_the_pipeline(tmp_path):
    """The shipped model (stages/models/toy_icl), evaluated by `pipeline eval` machinery on a held-out task:
    8 demonstrations that cover the answers lift VQA accuracy far above zero-shot (issue 8)."""
    import os

    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import evaluate
    from stages.tasks.toy_icl import write_toy_icl

    model = os.path.join(os.path.dirname(__file__), "..", "stages", "models", "toy_icl")
    data = str(tmp_path / "toy")
    write_toy_icl(data, permutation_seed=5, n_train=64, n_val=64)
    sets = [f"model.path={model}", f"task.root={data}", f"run_dir={tmp_path}", "eval.num_samples=64"]
    zero = evaluate.run(resolve(load_config(None, [*sets, "eval.mode=zero-shot"])))["vqa_accuracy"]
    icl = evaluate.run(resolve(load_config(None, [*sets, "eval.mode=icl", "eval.shots=8", "eval.sampler=cover"])))
    assert icl["vqa_accuracy"] >= zero + 25, (zero, icl)


def test_patching_the_teachers_own_outputs_reproduces_its_answers(tmp_path):
    """pipeline/mse_ceiling.py: with every layer's after-SA output on the zero-shot span replaced by the
    teacher's, the model answers exactly as the k-shot prompt does, query by query; the per-answer mean
    (the MSE-only ceiling) is a valid accuracy on the same queries."""
    from pipeline import mse_ceiling
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import teacher
    from stages.student import answer_start
    from stages.tasks.prompts import reference_answer
    from storage.reader import read_items

    data = str(tmp_path / "toy")
    write_toy_icl(data, permutation_seed=2, n_train=24, n_val=8)
    cfg = resolve(load_config(None, [f"model.path={model_dpath()}", f"task.root={data}", f"run_dir={tmp_path}",
                                     "teacher.shots=8", "teacher.sampler=cover", "teacher.capture=attn",
                                     "teacher.shard_size=8"]))
    teacher.run(cfg)
    measured = mse_ceiling.run(cfg)

    lm = load_model(model_dpath(), "auto", "float32", False)
    task = get_task("vqav2")
    by_id = {s.id: s for s in task.load(data, "train")}
    hits = 0
    for it in read_items(cfg.teacher.store):  # the k-shot prompt the teacher ran, from the ICD ids it stored
        q = by_id[it.sample_id]
        icds = [(by_id[i], reference_answer(by_id[i], "most_common")) for i in it.icd_ids]
        enc = encode(lm, [build_prompt("vqa", "icl", q, icds, answer=reference_answer(q, "most_common"))])
        with torch.no_grad():
            logits = lm.model(**enc.inputs).logits[0]
        at = logits.shape[0] - len(it.token_ids) + answer_start(lm, "vqa", q)
        hits += int(logits[at - 1].argmax() == enc.inputs["input_ids"][0, at])
    assert measured["n"] == 24 and measured["teacher"] == pytest.approx(100 * hits / 24)
    assert 0 <= measured["ceiling"] <= 100 and measured["zero_shot"] != measured["teacher"]


def test_bare_episode_is_the_student_sequence():
    """--bare-frac episodes start right after BOS: a one-item bare episode is the student's [BOS] + span."""
    script = _script()
    model, processor = build_model(0)
    idefics2.prepare_processor(processor)
    lm = LoadedModel("idefics2", idefics2, model, processor, "toy")
    eps = script.Episodes(lm)
    query = Sample("0", "", QUESTION, (WORDS[5],))
    prompt = build_prompt("vqa", "mimic", query, [], answer=WORDS[5], load=lambda s: eps.blank)
    enc = encode(lm, [prompt])
    ids, where = eps.ids((WORDS[5],), bare=True)
    assert ids == enc.inputs["input_ids"][0].tolist() and ids[where[0]] == eps.word_ids[WORDS[5]]
    full, _ = eps.ids((WORDS[2], WORDS[5]))
    bare, bare_where = eps.ids((WORDS[2], WORDS[5]), bare=True)
    assert full[1 + eps.n_instruction:] == bare[1:] and len(bare_where) == 2


def test_second_phase_starts_from_the_saved_model_and_records_both_phases(tmp_path):
    script = _script()
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    tiny = ["--batch", "2", "--k-max", "2", "--pool", "4", "--warmup", "1", "--eval-every", "1000",
            "--eval-episodes", "8", "--threads", "1"]
    script.main(["--out", str(tmp_path / "run1"), "--final", first, "--steps", "2", *tiny])
    script.main(["--out", str(tmp_path / "run2"), "--final", second, "--steps", "3", "--init", first, "--lm-loss",
                 "--bare-frac", "0.5", *tiny])
    summary = json.load(open(os.path.join(second, "training.json")))
    assert [p["steps"] for p in summary["phases"]] == [2, 3]
    assert summary["phases"][1]["args"]["init"] == first and summary["phases"][1]["args"]["lm_loss"]
    assert summary["minutes"] == pytest.approx(sum(p["minutes"] for p in summary["phases"]), abs=0.02)
    a, b = load_model(first).model.state_dict(), load_model(second).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained on from the first phase's weights


def test_experiment_command_writes_table_plot_and_resumes(tmp_path):
    """`pipeline experiment toy-icl` on two permutations in two processes, with a short student and a sweep over
    two training-set sizes: every method has a number, the tables and plots are written, every sweep student
    takes the same number of steps, and a rerun (in one process) redoes nothing."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    out = str(tmp_path / "exp")
    args = ["experiment", "toy-icl", "--out", out, "--tasks", "2", "--num-samples", "8", "--sweep", "8,40",
            "--sweep-steps", "6", "--set", "student.epochs=1", "--set", "task.num_queries=40",
            "--set", "teacher.shard_size=8"]
    result = CliRunner().invoke(cli, [*args, "--jobs", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["family"] == "lookup" and set(results["per_task"]) == {"0", "1"}
    row = results["per_task"]["1"]
    assert set(row) == {"zero_shot", "icl", "mimic", "mimic_answer", "mse_only", "ce_only", "patched_teacher",
                        "patched_ceiling", "sweep"}
    assert set(row["icl"]) == {"1", "2", "4", "8", "16", "32"} and set(row["mimic"]) == {"8", "16"}
    assert set(row["sweep"]) == {"8", "40"} and all(set(r) == {"mimic", "mse_only", "ce_only"}
                                                     for r in row["sweep"].values())
    assert all(0 <= a <= 100 for m in ("icl", "mimic", "mimic_answer", "mse_only", "ce_only", "patched_teacher",
                                       "patched_ceiling")
               for a in row[m].values())
    assert row["ce_only"]["8"] == row["ce_only"]["16"]
    for method, ce_on in (("mimic", "all"), ("mimic_answer", "answer")):
        student = json.load(open(os.path.join(out, "perm1", f"student-{method}-8shot", "config.json")))["student"]
        assert (student["ce_on"], student["w_align"], student["w_ce"]) == (ce_on, 1.0, 0.5)
    for n, steps_per_epoch in ((8, 2), (40, 10)):  # 6 steps at the global batch of 4: 3 epochs of 8, 1 of 40 (rounded)
        log = [json.loads(line) for line in open(os.path.join(out, "perm1", f"student-sweep-n{n}-mimic", "losses.jsonl"))]
        assert max(r["step"] for r in log) == max(1, round(6 * 4 / n)) * steps_per_epoch
    assert os.path.isdir(os.path.join(out, "perm1", "store-8shot-n8"))
    assert not os.path.exists(os.path.join(out, "perm1", "store-8shot-n40"))  # all 40 queries: the main store
    table = open(os.path.join(out, "results.md")).read()
    assert "| MimIC, MSE only |" in table and "| MSE-only ceiling (see below) |" in table
    assert "16 test queries in all" in table and "| 40 |" in table
    for plot in ("accuracy_vs_k.png", "accuracy_vs_n.png"):
        assert os.path.getsize(os.path.join(out, plot)) > 1000
    stamps = {f: os.path.getmtime(f) for name in ("heads.safetensors", "metrics.json", "ceiling.json")
              for f in _files(out, name)}
    assert len(_files(out, "ceiling.json")) == 4  # 2 permutations x 2 teachers
    # The rerun goes on from the small results alone, as on a fresh machine with what .gitignore keeps of a bench/
    # experiment: no store, no checkpoint, and the configs written in a checkout somewhere else.
    stores = [d for d in glob.glob(os.path.join(out, "perm*", "*")) if os.path.isfile(os.path.join(d, "manifest.json"))]
    assert len(stores) == 2 * 5  # per permutation: the 8- and 16-shot teachers, their after-SA twins, the n8 store
    for d in [*stores, *glob.glob(os.path.join(out, "perm*", "student-*", "checkpoints"))]:
        shutil.rmtree(d)
    for fpath in _files(out, "config.json"):
        config = json.load(open(fpath))
        assert config["model"]["path"] == model_dpath()
        config["model"]["path"] = "/elsewhere/checkout/stages/models/toy_icl"
        json.dump(config, open(fpath, "w"))
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0 and json.load(open(os.path.join(out, "results.json")))["summary"] == results["summary"]
    assert stamps == {f: os.path.getmtime(f) for f in stamps}  # nothing was trained, evaluated or measured again
    assert not any(os.path.isfile(os.path.join(d, "manifest.json")) for d in stores)  # nor any store rebuilt


def test_killing_the_experiment_ends_its_task_processes(tmp_path):
    """With --jobs each task runs in a process of its own; a SIGKILL of the experiment (no handler of its runs)
    must not leave them training on unseen."""
    import psutil
    cmd = [sys.executable, "-m", "pipeline.cli", "experiment", "toy-icl", "--out", str(tmp_path / "exp"), "--tasks", "2",
           "--jobs", "2", "--sweep", "", "--set", "student.epochs=100000"]  # far longer than this test waits
    parent = psutil.Process(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)
    workers = []
    try:
        while len(workers) < 2:  # the pool's two task processes, started with the first tasks
            assert parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE, "the experiment ended early"
            workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.5)
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=120)  # they notice within seconds; slack for a busy machine
        assert not alive, f"task processes still running after the experiment was killed: {alive}"
    finally:
        for p in [parent, *workers]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_experiments_refuse_a_directory_made_with_other_weights(tmp_path):
    """Each experiment records the sha256 of the model's weights in out/model.json (checked here with hashlib), and
    refuses a directory whose results were made with other weights, in one line, before writing anything."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.experiment import check_model
    check_model(str(tmp_path / "new"), ())
    digest = hashlib.sha256(open(os.path.join(model_dpath(), "model.safetensors"), "rb").read()).hexdigest()
    assert json.load(open(tmp_path / "new" / "model.json")) == {"weights_sha256": digest}
    out = tmp_path / "old"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    for command in (["toy-icl"], ["compare"], ["variants"]):
        result = CliRunner().invoke(cli, ["experiment", *command, "--out", str(out)])  # main() prints it as `error: …`
        message = str(result.exception)
        assert isinstance(result.exception, UserError) and "\n" not in message, result.output
        assert f"holds results of a model with weights sha256 {'0' * 12}, but {model_dpath()} has {digest[:12]}" in message
    assert os.listdir(out) == ["model.json"]


def _files(root: str, name: str) -> list[str]:
    return [os.path.join(d, name) for d, _, files in os.walk(root) if name in files]
