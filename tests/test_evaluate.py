"""Evaluation (METHOD.md §6): batching and the KV cache change no prediction, stop words cut as specified,
and `pipeline eval` runs end to end and refuses bad input in one line."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stages.evaluate import cut_at_stop_words, generate
from stages.models import load_model
from stages.models.encode import encode
from stages.models.heads import attach, build_heads, detach
from stages.tasks import VQA_STOP_WORDS, get_task
from stages.tasks.prompts import build_prompt, reference_answer
from stages.tasks.sampler import sample_icds
from tests.conftest import FAMILIES

TASK = get_task("vqav2")


def _prompts(data_root, plan):
    """plan: (mode, k) per prompt; queries from val, demonstrations from train, as `evaluate.run` draws them."""
    support = TASK.load(data_root, "train")
    queries = TASK.load(data_root, "val")
    by_id = {s.id: s for s in support}
    prompts = []
    for q, (mode, k) in zip(queries, plan):
        icd_ids = sample_icds([s.id for s in support], q.id, k, seed=0, view=0)
        prompts.append(build_prompt(TASK.kind, mode, q, [(by_id[i], reference_answer(by_id[i])) for i in icd_ids]))
    return prompts


# --- (a) batching ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_one_sample_at_a_time(family, model_dirs, data_root):
    lm = load_model(model_dirs[family], dtype="float64")
    prompts = _prompts(data_root, [("zero-shot", 0), ("icl", 1), ("icl", 3), ("mimic", 0)])
    batch = encode(lm, prompts).inputs
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(prompts), "rows should have different lengths, so they are padded"

    kwargs = dict(max_new_tokens=10, stop_words=TASK.stop_words, num_beams=3)
    batched = generate(lm, batch, **kwargs)
    single = [generate(lm, encode(lm, [p]).inputs, **kwargs)[0] for p in prompts]
    assert len(set(single)) >= 3, f"too few distinct predictions to tell rows apart: {single}"
    assert batched == single


# --- (b) the KV cache with MimIC heads -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_with_heads_equals_uncached(family, model_dirs, data_root):
    lm = load_model(model_dirs[family], dtype="float64")
    # A MimIC row ([BOS] + query) and a 2-shot row: different lengths, so the shorter one is left-padded.
    prompts = _prompts(data_root, [("mimic", 0), ("icl", 2)])
    inputs = {k: v for k, v in encode(lm, prompts).inputs.items() if k != "position_ids"}
    assert not inputs["attention_mask"].all()
    tok = lm.tokenizer
    n_new = 8

    step_lens = []
    hook = lm.model.register_forward_pre_hook(
        lambda m, args, kw: step_lens.append(kw["input_ids"].shape[1]), with_kwargs=True)

    def run(use_cache):
        step_lens.clear()
        out = lm.model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                                use_cache=use_cache, output_logits=True, return_dict_in_generate=True,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return out, list(step_lens)

    plain, _ = run(True)
    heads = build_heads(lm.dims.n_layers, lm.dims.n_heads, lm.dims.head_dim).double()
    with torch.no_grad():
        heads.shift_lhd.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    attach(lm, heads)
    try:
        cached, cached_lens = run(True)
        uncached, uncached_lens = run(False)
    finally:
        detach(lm)
        hook.remove()

    t = inputs["input_ids"].shape[1]
    assert cached_lens == [t] + [1] * (n_new - 1), "the cached run should feed one new token per step"
    assert uncached_lens == list(range(t, t + n_new)), "the uncached run should feed the whole sequence"
    assert len(cached.logits) == len(uncached.logits) == n_new
    # The heads must matter, or the comparison says nothing about them.
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, plain.logits)) > 1e-3
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, step=step: f"step {step}: {m}")


# --- (c) stop words and the CLI --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, stop_words, expected", [
    ("  blue  ", VQA_STOP_WORDS, "blue"),                        # no stop word: only stripped
    ("red\nQuestion: what?", VQA_STOP_WORDS, "red"),
    (" yes Answer: no", VQA_STOP_WORDS, "yes"),
    ("two Image: three", VQA_STOP_WORDS, "two"),
    ("\nred", VQA_STOP_WORDS, ""),                               # a stop word first: empty prediction
    ("a Answer b\nc", ("\n", "Answer"), "a"),                    # the earliest match wins, whatever the tuple order
    ("a Answer b\nc", ("Answer", "\n"), "a"),
    ("a\nb Answer", ("Answer", "\n"), "a"),
    ("the question is", VQA_STOP_WORDS, "the question is"),      # case-sensitive, as in the authors' code
    ("QuesQuestion", VQA_STOP_WORDS, "Ques"),
    ("a caption. Caption: b", get_task("coco").stop_words, "a caption."),
    (" keep all ", (), "keep all"),
])
def test_cut_at_stop_words(text, stop_words, expected):
    assert cut_at_stop_words(text, stop_words) == expected


@given(st.text(alphabet=st.sampled_from(list("ab \nQuestionAnswerImage")), max_size=40))
def test_cut_at_stop_words_keeps_the_stripped_prefix_before_every_stop_word(text):
    out = cut_at_stop_words(text, VQA_STOP_WORDS)
    assert not any(w in out for w in VQA_STOP_WORDS)
    ends = [text.find(w) for w in VQA_STOP_WORDS if w in text]
    prefix = text[: min(ends)] if ends else text
    assert out == prefix.strip()


def _pipeline(args, tmp_path):
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp_path / "home")}
    script = os.path.join(os.path.dirname(sys.executable), "pipeline")  # the installed console script
    assert os.path.isfile(script), f"no `pipeline` script next to {sys.executable}; install the package"
    cmd = [script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)  # generous: a loaded CI machine


def test_pipeline_eval_end_to_end(model_dirs, data_root, tmp_path):
    sets = ["--set", f"model.path={model_dirs['idefics2']}", "--set", f"task.root={data_root}",
            "--set", f"run_dir={tmp_path}"]
    val_ids = [s.id for s in TASK.load(data_root, "val")]
    random.Random(3407).shuffle(val_ids)  # task.seed's order, then the first 8
    val_ids = val_ids[:8]
    predictions = {}
    for mode, extra, out in [("zero-shot", [], "eval-zero-shot-vqav2"), ("icl", ["--shots", "2"], "eval-icl-2shot-vqav2")]:
        proc = _pipeline(["eval", "--mode", mode, *extra, "--num-samples", "8", *sets], tmp_path)
        assert proc.returncode == 0, proc.stderr
        out_dpath = tmp_path / out
        with open(out_dpath / "predictions.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 8
        assert [r["id"] for r in rows] == val_ids
        assert all(isinstance(r["prediction"], str) and len(r["answers"]) == 10 for r in rows)
        metrics = json.load(open(out_dpath / "metrics.json"))
        assert metrics["mode"] == mode and metrics["n"] == 8
        assert metrics["shots"] == (2 if mode == "icl" else 0)
        assert 0.0 <= metrics["vqa_accuracy"] <= 100.0
        assert json.load(open(out_dpath / "config.json"))["eval"]["mode"] == mode
        predictions[mode] = [r["prediction"] for r in rows]
    # The demonstrations reach the model: 2-shot prompts change what a random model says.
    assert predictions["icl"] != predictions["zero-shot"]
    assert not (tmp_path / "home").exists(), "explicit model and data paths must not build the embedded default"


def test_pipeline_eval_refuses_a_missing_model_in_one_line(data_root, tmp_path):
    proc = _pipeline(["eval", "--num-samples", "8", "--set", "model.path=/nonexistent",
                      "--set", f"task.root={data_root}", "--set", f"run_dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "/nonexistent" in lines[0]
