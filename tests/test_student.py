"""The student end to end, as separate processes (DeepSpeed keeps process-global state)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from stages.tasks.prompts import reference_answer
from tests.conftest import random_image

PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def _env(tmp):
    return {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dirs, data_root):
    tmp = tmp_path_factory.mktemp("student")
    common = ["--set", f"model.path={model_dirs['idefics2']}", "--set", f"task.root={data_root}",
              "--set", f"run_dir={tmp}", "--set", "task.num_queries=16", "--set", "teacher.shard_size=4"]
    out = subprocess.run(PIPELINE + ["run", "teacher", "--shots", "4", *common], env=_env(tmp),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp, common + ["--shots", "4"]


def _student(tmp, common, out, *extra):
    cmd = PIPELINE + ["run", "student", *common, "--set", f"student.out={out}", *extra]
    result = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _heads(out):
    return load_file(os.path.join(out, "heads", "heads.safetensors"))


def test_student_trains_heads_and_logs_losses(setup):
    tmp, common = setup
    out = tmp / "plain"
    result = _student(tmp, common, out)
    assert "528 trainable parameters" in result.stdout  # 4 layers x 4 heads x (2 x 16 + 1)
    rows = [json.loads(line) for line in open(out / "losses.jsonl")]
    assert len(rows) == 10 * 16 // 4 and rows[-1]["step"] == 40
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the seconds each step waited for its batches, logged and shown on the progress bar
    assert all(type(r["data_wait_s"]) is float and r["data_wait_s"] >= 0 for r in rows), rows
    assert re.search(r"student: 100%.*40/40.*wait=\d+ms", result.stderr), result.stderr[-2000:]
    config = json.load(open(out / "heads" / "heads.json"))
    assert (config["n_layers"], config["n_heads"], config["head_dim"]) == (4, 4, 16)


def test_unmasked_log_z2_trains_other_heads_and_says_so(setup):
    """student.log_z2=unmasked reaches the heads the student trains: heads.json records it, and since log Z2
    then counts future and padding keys, the trained weights differ from the masked default's."""
    tmp, common = setup
    masked, unmasked = tmp / "lz2-masked", tmp / "lz2-unmasked"
    _student(tmp, common, masked, "--epochs", "1")
    _student(tmp, common, unmasked, "--epochs", "1", "--set", "student.log_z2=unmasked")
    assert json.load(open(masked / "heads" / "heads.json"))["masked_log_z2"] is True
    assert json.load(open(unmasked / "heads" / "heads.json"))["masked_log_z2"] is False
    a, b = _heads(masked), _heads(unmasked)
    assert any((a[name] - b[name]).abs().max() > 1e-6 for name in a)


def test_killed_student_resumes_to_identical_heads(setup):
    """Killed after a checkpoint that falls mid-epoch, the student resumes from it: the same step, data position,
    optimizer state and schedule, so its log and heads equal those of a run never interrupted.

    16 items, global batch 4: 4 steps an epoch, 40 in all. With save_every=11 every checkpoint before the last
    (steps 11, 22, 33) falls mid-epoch, so a resume that restarts the epoch's data from item 0, or retrains from
    step 1, changes the losses. The optimizer state has no direct check: Adam's update is m/sqrt(v) of its
    moments, and a fresh optimizer's first update (about lr x sign of the gradient) differs from one with the
    moments of the steps before; the loss of the second step after the checkpoint is taken after that update,
    so it equals the uninterrupted run's only if the moments were restored.
    """
    tmp, common = setup
    save = ["--set", "student.save_every=11"]
    full, killed = tmp / "full", tmp / "killed"
    _student(tmp, common, full, *save)
    log = tmp / "killed.log"
    with open(log, "w") as f:  # a file, not a pipe nobody reads, which would block the student once full
        proc = subprocess.Popen(PIPELINE + ["run", "student", *common, "--set", f"student.out={killed}", *save],
                                env=_env(tmp), stdout=f, stderr=subprocess.STDOUT)
    latest = killed / "checkpoints" / "last_complete"
    limit_s = 1800  # loading the model and 11 steps take well under a minute; this is for a busy machine
    deadline = time.monotonic() + limit_s
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    code = proc.wait()
    assert latest.exists(), (f"the student wrote no checkpoint ({latest}) within {limit_s} s of its start "
                             f"(exit code {code}); its output ends:\n{log.read_text()[-3000:]}")
    assert code == -signal.SIGKILL, "the student finished before it could be killed"
    assert not (killed / "heads").exists()
    tag = latest.read_text().strip()
    step = int(tag.removeprefix("step"))
    epoch, done = divmod(step, 4)
    assert tag == f"step{step}" and done != 0 and step < 40, f"{tag} is not mid-epoch"

    resumed = _student(tmp, common, killed, *save)
    rows = [json.loads(line) for line in open(killed / "losses.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 41)), "steps logged more than once, or missing"
    assert (f"resuming from checkpoint after step {step} of 40 (epoch {epoch} continues at item {4 * done})"
            in resumed.stdout), resumed.stdout
    expected = [json.loads(line) for line in open(full / "losses.jsonl")]
    for got, want in zip(rows, expected):  # loss, its parts, lr and epoch, bit for bit; not the data wait, a timing
        assert got.pop("data_wait_s") >= 0 and want.pop("data_wait_s") >= 0
        assert got == want, f"resumed after step {step}: step {want['step']} differs"
    a, b = _heads(full), _heads(killed)
    for name in a:
        assert (a[name] == b[name]).all(), name


def test_two_ranks_train_the_same_heads_as_one(setup):
    tmp, common = setup
    one, two = tmp / "one", tmp / "two"
    _student(tmp, common, one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.cli", "run", "student", *common, "--set", f"student.out={two}"]
    result = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _heads(one), _heads(two)
    for name in a:  # the global batch is the same; only the order of float sums differs
        assert (a[name] - b[name]).abs().max() < 1e-4, name


def test_student_refuses_a_store_made_with_other_shots(setup):
    tmp, common = setup
    cmd = PIPELINE + ["run", "student", *common, "--shots", "8", "--set", f"teacher.store={tmp}/store-vqav2-4shot",
                      "--set", f"student.out={tmp}/refused"]
    result = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "shots: store has 4, config has 8" in result.stderr
    assert not (tmp / "refused" / "heads").exists()


def test_student_trains_from_a_text_only_store(setup):
    tmp, common = setup
    store = tmp / "store-text"
    out = subprocess.run(PIPELINE + ["run", "teacher", *common, "--set", "teacher.span=text", "--store", str(store)],
                         env=_env(tmp), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    _student(tmp, common, tmp / "text", "--set", "teacher.span=text", "--store", str(store))
    rows = [json.loads(line) for line in open(tmp / "text" / "losses.jsonl")]
    assert len(rows) == 40 and all(r["l_align"] > 0 for r in rows)
    # With span=all set explicitly, the text-only store is refused by name (unset, the store's span is taken).
    refused = subprocess.run(PIPELINE + ["run", "student", *common, "--store", str(store), "--set", "teacher.span=all",
                                         "--set", f"student.out={tmp}/refused-span"], env=_env(tmp),
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "span: store has 'text', config has 'all'" in refused.stderr, refused.stderr


def test_heads_mimic_icl_on_held_out_queries(setup):
    """L_align on a store of queries the student never saw falls below 0.8 x its value with fresh heads.

    Trained on L_align alone with a larger learning rate: on this random-initialised model the CE term
    dominates the paper's default mix (see the issue note), and this test is about the alignment.
    """
    tmp, common = setup
    heldout = tmp / "store-heldout"
    out = subprocess.run(PIPELINE + ["run", "teacher", *common, "--store", str(heldout), "--set", "task.query_split=val",
                                     "--set", "task.support=train", "--set", "task.num_queries=8"],
                         env=_env(tmp), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    heads = tmp / "align-only"
    _student(tmp, common, heads, "--set", "student.w_ce=0", "--set", "student.lr=0.05")
    result = subprocess.run(PIPELINE + ["eval", "--mode", "align", *common[:6], "--store", str(heldout),
                                        "--heads", str(heads / "heads"), "--set", f"eval.out={tmp}/align-eval"],
                            env=_env(tmp), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.splitlines()[-2])
    assert metrics["n"] == 8 and metrics["l_align_init"] > 0
    assert metrics["l_align_trained"] <= 0.8 * metrics["l_align_init"], metrics


def test_zero_stages_train_the_same_heads(setup):
    tmp, common = setup
    heads = {}
    for stage in (0, 3):
        _student(tmp, common, tmp / f"zero{stage}", "--zero-stage", str(stage))
        heads[stage] = _heads(tmp / f"zero{stage}")
    for name in heads[0]:
        assert (heads[0][name] - heads[3][name]).abs().max() < 1e-5, name


def test_batch_aligns_targets_and_masks_with_the_span(setup, model_dirs, data_root):
    """make_batch: [BOS] + stored span, targets at the span's positions, L_gt from the answer on when asked."""
    from stages.models import load_model
    from stages.models.encode import tokenize
    from stages.batches import make_batch
    from stages.tasks import get_task
    from stages.tasks.prompts import build_prompt
    from storage.reader import read_items

    tmp, _ = setup
    lm = load_model(model_dirs["idefics2"])
    items = list(read_items(str(tmp / "store-vqav2-4shot")))[:3]
    samples = {s.id: s for s in get_task("vqav2").load(data_root, "train")}
    starts = {}
    for it in items:
        ids, start = tokenize(lm, build_prompt("vqa", "mimic", samples[it.sample_id], [], load=lambda _: None))
        starts[it.sample_id] = len(ids) - start
    images = [[samples[it.sample_id].load_image()] for it in items]
    inputs, target, span_mask, ce_mask = make_batch(lm, items, images, starts)
    t = inputs["input_ids"].shape[1]
    for b, it in enumerate(items):
        n = len(it.token_ids)
        assert inputs["input_ids"][b, t - n - 1] == lm.tokenizer.bos_token_id
        assert inputs["input_ids"][b, t - n:].tolist() == it.token_ids.tolist()
        assert span_mask[b].sum() == n and torch.equal(target[b, t - n:], it.hidden)
        answer = lm.tokenizer.decode(inputs["input_ids"][b][ce_mask[b].bool()])
        assert answer.strip() == f"{reference_answer(samples[it.sample_id])}</s>".strip()


def test_l_gt_targets_are_the_span_tokens_only(setup, model_dirs):
    """Without answer_starts, L_gt predicts every span token and nothing before it (not BOS from a pad)."""
    from stages.models import load_model
    from stages.batches import make_batch
    from storage.reader import read_items

    tmp, _ = setup
    lm = load_model(model_dirs["idefics2"])
    by_length = sorted(read_items(str(tmp / "store-vqav2-4shot")), key=lambda it: len(it.token_ids))
    items = [by_length[0], by_length[-1]]
    assert len(items[0].token_ids) < len(items[1].token_ids)  # the first row is padded
    images = [[random_image(i)] for i in range(2)]
    inputs, _, _, ce_mask = make_batch(lm, items, images)
    short, long = (len(it.token_ids) for it in items)
    t = 1 + long  # [BOS] + the longest span; the shorter row is left-padded to it
    assert inputs["input_ids"].shape[1] == t
    # L_gt's targets are positions t-n..t-1 (the span); a row's BOS and its pads before it are not.
    assert ce_mask[1].tolist() == [0] + [1] * long
    pads = t - 1 - short
    assert inputs["attention_mask"][0].tolist() == [0] * pads + [1] * (1 + short)  # the padded row
    assert inputs["input_ids"][0, pads] == lm.tokenizer.bos_token_id
    assert ce_mask[0].tolist() == [0] * pads + [0] + [1] * short


def test_resume_with_another_training_config_is_refused(setup):
    tmp, common = setup
    out = tmp / "resume-changed"
    _student(tmp, common, out, "--set", "student.save_every=8")
    result = subprocess.run(PIPELINE + ["run", "student", *common, "--set", f"student.out={out}",
                                        "--set", "student.lr=0.01"], env=_env(tmp), capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lr: checkpoint has 0.005, config has 0.01" in result.stderr, result.stderr


def test_heads_for_another_model_are_refused(setup, model_dirs):
    from stages.errors import UserError
    from stages.models import load_model
    from stages.models.heads import build_heads, load_heads, save_heads

    tmp, _ = setup
    save_heads(build_heads(2, 4, 16), str(tmp / "wrong-heads"), {})
    with pytest.raises(UserError, match="heads in .* are for 2 layers x 4 heads x 16 dims"):
        load_heads(str(tmp / "wrong-heads"), load_model(model_dirs["idefics2"]))


def test_on_the_embedded_default_the_paper_defaults_lower_l_align(tmp_path):
    """Issue 4's acceptance on the embedded default (the toy ICL model and its held-out task 0) with the
    paper's student settings (w_align 1, w_ce 0.5 on every span token, lr 5e-3, its 10 epochs below 1,000
    samples rather than the default's 40): L_align's last-epoch mean
    is at most 0.7 x its first-epoch mean, and on queries the student never saw the trained heads'
    L_align is at most 0.8 x that of the heads it started from."""
    common = ["--set", f"run_dir={tmp_path}", "--shots", "8"]
    for args in (["run", "teacher", *common], ["run", "student", *common, "--set", "student.epochs=10"],
                 ["run", "teacher", *common, "--store", str(tmp_path / "heldout"), "--set", "task.query_split=val",
                  "--set", "task.support=train", "--set", "task.num_queries=64"]):
        result = subprocess.run(PIPELINE + args, env=_env(tmp_path), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "student-vqav2-8shot" / "losses.jsonl")]
    first = [r["l_align"] for r in rows if r["epoch"] == 0]
    last = [r["l_align"] for r in rows if r["epoch"] == rows[-1]["epoch"]]
    assert sum(last) / len(last) <= 0.7 * sum(first) / len(first), (first[:4], last[-4:])
    result = subprocess.run(PIPELINE + ["eval", "--mode", "align", "--set", f"run_dir={tmp_path}", "--set", "teacher.shots=8",
                                        "--store", str(tmp_path / "heldout")],
                            env=_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.splitlines()[-2])
    assert metrics["n"] == 64 and metrics["l_align_trained"] <= 0.8 * metrics["l_align_init"], metrics


def test_bf16_student_saves_the_fp32_master_heads(tmp_path, model_dirs, data_root):
    """Under bf16 DeepSpeed trains fp32 master weights and the module holds their bf16 rounding; the saved
    heads are the masters, so some values are not bf16 numbers."""
    common = ["--set", f"model.path={model_dirs['idefics2']}", "--set", f"task.root={data_root}",
              "--set", f"run_dir={tmp_path}", "--set", "task.num_queries=8", "--set", "teacher.shard_size=4",
              "--set", "model.dtype=bfloat16", "--shots", "2"]
    out = subprocess.run(PIPELINE + ["run", "teacher", *common], env=_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    _student(tmp_path, common, tmp_path / "bf16", "--epochs", "2")
    heads = _heads(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in heads.values())
    assert any((v != v.bfloat16().float()).any() for v in heads.values())


def test_answer_only_ce_masks_everything_before_the_answer(tmp_path):
    """student.ce_on=answer: answer_start finds the answer in the span, and L_gt is taken on answer + EOS only."""
    from stages.models import load_model
    from stages.models.encode import encode
    from stages.batches import make_batch
    from stages.student import answer_start
    from stages.tasks import get_task
    from stages.tasks.prompts import build_prompt
    from stages.tasks.toy_icl import model_dpath, write_toy_icl
    from storage.writer import Item

    write_toy_icl(str(tmp_path / "toy"), 1, n_train=8, n_val=8)
    lm = load_model(model_dpath(), "auto", "float32", False)
    queries = get_task("vqav2").load(str(tmp_path / "toy"), "train")[:2]
    items, starts = [], {}
    for q in queries:
        answer = reference_answer(q, "most_common")
        span = encode(lm, [build_prompt("vqa", "mimic", q, [], answer=answer)]).span_ids[0]
        starts[q.id] = answer_start(lm, "vqa", q)
        answer_ids = lm.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        assert span[starts[q.id]:] == [*answer_ids, lm.tokenizer.eos_token_id]  # one toy word: one token
        hidden = torch.zeros(len(span), lm.dims.n_layers, lm.dims.d_model)
        items.append(Item(q.id, 0, torch.tensor(span).numpy(), hidden, (), torch.ones(len(span), dtype=bool).numpy()))
    inputs, _, _, ce_mask = make_batch(lm, items, [[q.load_image()] for q in queries], starts)
    t = inputs["input_ids"].shape[1]
    assert [row.nonzero().flatten().tolist() for row in ce_mask] == [[t - 2, t - 1]] * 2


def test_the_embedded_default_trains_its_own_epochs_unless_told():
    """40 epochs on the embedded default (the paper's rule undertrains the toy heads); any data set of
    one's own keeps the paper's rule (epochs 0), and an explicit student.epochs always wins."""
    from pipeline.config import load_config
    from pipeline.defaults import DEFAULT_EPOCHS, resolve
    assert resolve(load_config(None, []), build_defaults=False).student.epochs == DEFAULT_EPOCHS == 40
    assert resolve(load_config(None, ["student.epochs=3"]), build_defaults=False).student.epochs == 3
    assert resolve(load_config(None, ["task.root=/data/vqav2"]), build_defaults=False).student.epochs == 0


def test_run_all_trains_and_evaluates_and_summarises(tmp_path):
    """`pipeline run all`, the main job, on the toy model and a small held-out toy task: teacher, student,
    then the three evaluations, whose accuracies the last line sums up as written in their metrics.json."""
    from stages.tasks.toy_icl import write_toy_icl
    write_toy_icl(str(tmp_path / "toy"), 3, n_train=32, n_val=16)
    result = subprocess.run(PIPELINE + ["run", "all", "--shots", "8", "--set", f"task.root={tmp_path / 'toy'}",
                                        "--set", f"run_dir={tmp_path / 'runs'}", "--set", "student.epochs=2",
                                        "--set", "eval.num_samples=16", "--set", "teacher.shard_size=8"],
                            env=_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    written = {mode: json.load(open(tmp_path / "runs" / name / "metrics.json"))["vqa_accuracy"]
               for mode, name in (("zero-shot", "eval-zero-shot-vqav2"), ("icl", "eval-icl-8shot-vqav2"),
                                  ("mimic", "eval-mimic-vqav2"))}
    assert os.path.isfile(tmp_path / "runs" / "student-vqav2-8shot" / "heads" / "heads.safetensors")
    assert result.stdout.splitlines()[-1] == (
        f"vqa_accuracy on 16 vqav2 queries: zero-shot {written['zero-shot']:.1f}, 8-shot ICL {written['icl']:.1f}, "
        f"MimIC {written['mimic']:.1f}")


def test_one_rank_student_chooses_its_own_port_unless_a_launcher_gave_one(monkeypatch):
    """A port chosen by a parent process's one-process group is held by that parent: a child that inherits
    MASTER_PORT (a test's subprocess, an experiment worker) must choose another; a launcher's port is kept."""
    import deepspeed

    from stages import student
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv(student._PORT_OWNER, str(os.getpid() + 1))  # chosen by another process
    student._init_distributed(0, 1)
    assert os.environ["MASTER_PORT"] != "1" and os.environ[student._PORT_OWNER] == str(os.getpid())
    mine = os.environ["MASTER_PORT"]
    student._init_distributed(0, 1)  # our own choice: kept
    assert os.environ["MASTER_PORT"] == mine
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.delenv(student._PORT_OWNER)  # a launcher's (torchrun's) port
    student._init_distributed(0, 1)
    assert os.environ["MASTER_PORT"] == "29511"
