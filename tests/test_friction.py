"""What a user meets between the stages: a student that takes its teacher's settings from the store,
heads that cast themselves on attach, and a student progress bar that stays quiet in a log file."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from stages.models import load_model
from stages.models.heads import attach, build_heads, detach
from stages.progress import LOG_INTERVAL_S

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
STEPS = 24  # 8 queries / global batch 4 = 2 steps an epoch, 12 epochs


def _pipeline(tmp, *args):
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(PIPELINE + [str(a) for a in args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_shot(tmp_path_factory, model_dirs, data_root):
    """A 2-shot store S, and a student trained from it with no --shots (so the config says 32)."""
    tmp = tmp_path_factory.mktemp("friction")
    common = ["--set", f"model.path={model_dirs['idefics2']}", "--set", f"task.root={data_root}",
              "--set", f"run_dir={tmp}", "--set", "task.num_queries=8"]
    store = tmp / "S"
    teacher = _pipeline(tmp, "run", "teacher", "--shots", 2, "--store", store, "--set", "teacher.shard_size=4", *common)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    start = time.monotonic()
    student = _pipeline(tmp, "run", "student", "--store", store, "--epochs", STEPS // 2, *common)
    return tmp, common, store, student, time.monotonic() - start


def test_student_takes_the_teacher_settings_from_its_store(two_shot):
    tmp, _, store, student, _ = two_shot
    assert student.returncode == 0, student.stderr[-3000:]
    out = tmp / "student-vqav2-2shot"  # named by the store's k, not the config's default 32
    assert (out / "heads" / "heads.safetensors").is_file()
    assert not (tmp / "student-vqav2-32shot").exists()
    teacher = json.load(open(out / "config.json"))["teacher"]
    assert (teacher["shots"], teacher["store"]) == (2, str(store))
    assert len(open(out / "losses.jsonl").readlines()) == STEPS


def test_student_bar_in_a_log_is_drawn_rarely(two_shot):
    """stderr is a pipe here, as in a cluster job's log: the bar is drawn at its start, at its end and
    once every LOG_INTERVAL_S at most, not on each of the steps."""
    _, _, _, student, seconds = two_shot
    assert student.returncode == 0, student.stderr[-3000:]
    # tqdm starts each drawing with a carriage return, which splitlines (and text mode) take as a line end
    bars = re.findall(r"^student: +\d+%\|.*$", student.stderr, flags=re.M)
    assert bars and f"{STEPS}/{STEPS}" in bars[-1], student.stderr[-2000:]  # the last drawing shows the end
    assert len(bars) <= 3 + seconds / LOG_INTERVAL_S, f"{len(bars)} bars drawn in {seconds:.0f} s for {STEPS} steps"


def test_shots_set_against_the_store_are_refused(two_shot):
    tmp, common, store, _, _ = two_shot
    result = _pipeline(tmp, "run", "student", "--store", store, "--shots", 4, *common,
                       "--set", f"student.out={tmp}/refused")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert lines[:-1] == [f"error: store {store} does not match this student's config:",
                          "  shots: store has 2, config has 4"], result.stderr  # that field alone
    assert "leave teacher.shots unset" in lines[-1]
    assert not (tmp / "refused").exists()


def _config(two_shot, *overrides, config=""):
    """The config a command that reads a store runs with (the command's own function, in this process)."""
    from pipeline.cli import _config
    tmp, common, store, _, _ = two_shot
    (tmp / "exp.yaml").write_text(config)
    sets = [*common[1::2], f"teacher.store={store}", *overrides]  # common is --set pairs
    return _config(str(tmp / "exp.yaml"), sets, False, reads_store=lambda cfg: True)


@pytest.mark.parametrize("overrides, config, line", [
    (["teacher.span=text"], "", "span: store has 'all', config has 'text'"),
    (["teacher.views=2"], "", "views: store has 1, config has 2"),
    (["teacher.seed=1", "teacher.capture=ffn"], "", "seed: store has 0, config has 1"),  # capture agrees
    ([], "teacher: {sampler: cover, shots: 2}", "sampler: store has 'uniform', config has 'cover'"),
])
def test_each_teacher_setting_set_against_the_store_is_refused(two_shot, overrides, config, line):
    from storage.errors import StoreMismatch
    with pytest.raises(StoreMismatch) as e:
        _config(two_shot, *overrides, config=config)
    assert e.value.lines == [line]


def test_teacher_settings_left_unset_or_set_as_the_store_has_them_come_from_the_store(two_shot):
    tmp = two_shot[0]
    for overrides, config in [((), ""), (("teacher.views=1",), "teacher: {shots: 2, sampler: uniform}")]:
        cfg = _config(two_shot, *overrides, config=config)
        t = cfg.teacher
        assert (t.shots, t.sampler, t.seed, t.views, t.span, t.capture) == (2, "uniform", 0, 1, "all", "ffn")
        assert cfg.student.out == str(tmp / "student-vqav2-2shot")
        assert cfg.eval.heads == str(tmp / "student-vqav2-2shot" / "heads")


def test_student_determined_fields_are_still_checked(two_shot):
    """task.answer is the student's own: not taken from the store, so a store of another answer is refused."""
    tmp, common, store, _, _ = two_shot
    result = _pipeline(tmp, "run", "student", "--store", store, "--set", "task.answer=first", *common,
                       "--set", f"student.out={tmp}/refused-answer")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "  answer: store has 'most_common', config has 'first'" in result.stderr.splitlines(), result.stderr


def test_eval_with_heads_finds_the_student_of_its_store(two_shot):
    tmp, common, store, student, _ = two_shot
    assert student.returncode == 0, student.stderr[-3000:]
    result = _pipeline(tmp, "eval", "--mode", "mimic", "--store", store, "--num-samples", 2,
                       "--set", "eval.num_beams=1", "--set", f"eval.out={tmp}/eval-mimic", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(tmp / "eval-mimic" / "metrics.json"))["n"] == 2
    used = json.load(open(tmp / "eval-mimic" / "config.json"))
    assert (used["eval"]["heads"], used["teacher"]["shots"]) == (str(tmp / "student-vqav2-2shot" / "heads"), 2)


# -- attach ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(model_dirs):
    lm = load_model(model_dirs["idefics2"], dtype="float64")
    return lm.tokenizer(["What is it? Answer: red"], return_tensors="pt")


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_attach_casts_the_heads_to_the_model(model_dirs, tokens, dtype):
    lm = load_model(model_dirs["idefics2"], dtype=dtype)
    heads = build_heads(lm.dims.n_layers, lm.dims.n_heads, lm.dims.head_dim)  # float32, as built
    attach(lm, heads)
    try:
        assert {p.dtype for p in heads.parameters()} == {getattr(torch, dtype)}
        assert {p.device for p in heads.parameters()} == {next(lm.model.parameters()).device}
        assert lm.model(**tokens).logits.dtype == getattr(torch, dtype)
    finally:
        detach(lm)


def test_a_second_attach_must_say_replace(model_dirs, tokens):
    lm = load_model(model_dirs["idefics2"], dtype="float64")
    with torch.no_grad():
        base = lm.model(**tokens).logits
    first, second = (build_heads(lm.dims.n_layers, lm.dims.n_heads, lm.dims.head_dim) for _ in range(2))
    with torch.no_grad():
        first.shift_lhd.fill_(0.5)  # far from the identity
        second.shift_lhd.zero_()  # a zero shift adds nothing: the model's own output
    attach(lm, first)
    try:
        with torch.no_grad():
            shifted = lm.model(**tokens).logits
        assert (shifted - base).abs().max() > 1e-3
        with pytest.raises(RuntimeError, match="already attached.*replace=True"):
            attach(lm, second)
        with torch.no_grad():
            torch.testing.assert_close(lm.model(**tokens).logits, shifted, rtol=0, atol=0)  # still the first
        attach(lm, second, replace=True)
        with torch.no_grad():
            torch.testing.assert_close(lm.model(**tokens).logits, base, rtol=0, atol=0)  # now the second
    finally:
        detach(lm)
