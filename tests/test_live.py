"""LIVE ([live], METHOD.md §5) from a store with the teacher's answer-token logits (teacher.logits): the stored
logits against a plain transformers forward, LIVE's norm-keeping shift, the refusal of a store without logits, and
a LIVE run trained, saved, reloaded and evaluated, on the embedded default."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.defaults import resolve
from stages.errors import UserError
from stages.models import load_model
from stages.tasks.toy_icl import model_dpath
from storage.reader import read_items
from tests.test_teacher import VQA_INSTRUCTION, _processor_inputs, _vqa_item, _vqa_train

PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def _config(tmp_path, *overrides):
    return resolve(load_config(None, [f"run_dir={tmp_path}", "task.num_queries=8", "teacher.shots=2",
                                      "teacher.shard_size=4", *overrides]))


def _plain_span_logits(processor, model, data, item):
    """The k-shot prompt of a stored item written out by hand, run through transformers alone: the span's ids, and
    the logits [n, vocab] at its n positions."""
    q, icds = data[item.sample_id], [data[i] for i in item.icd_ids]
    context = VQA_INSTRUCTION + "".join(_vqa_item("idefics2", d) + "\n" for d in icds)
    query = _vqa_item("idefics2", q) + processor.tokenizer.eos_token
    images = [Image.open(d["image"]).convert("RGB") for d in [*icds, q]]
    n_ctx = len(_processor_inputs("idefics2", processor, context, images[:-1])["input_ids"][0])
    inputs = _processor_inputs("idefics2", processor, context + query, images)
    with torch.no_grad():
        logits = model(**inputs).logits[0, n_ctx:]
    return inputs["input_ids"][0, n_ctx:].tolist(), logits


@pytest.mark.parametrize("setting", ["topk:5", "full"])
def test_stored_logits_equal_a_plain_forward(setting, tmp_path):
    """teacher.logits: each item's rows are the positions whose next token is an answer token or the EOS, and hold
    the logits (the top K, largest first, or all) and logsumexp of a plain forward of its k-shot prompt."""
    from stages import teacher
    cfg = _config(tmp_path, f"teacher.logits={setting}", "teacher.batch_size=1")
    teacher.run(cfg)
    stored = list(read_items(cfg.teacher.store))
    processor = transformers.AutoProcessor.from_pretrained(cfg.model.path)
    processor.image_processor.do_image_splitting = False
    model = transformers.Idefics2ForConditionalGeneration.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    data = _vqa_train(cfg.task.root)
    assert len(stored) == 8
    for item in stored:
        span, logits = _plain_span_logits(processor, model, data, item)
        assert item.token_ids.tolist() == span
        # the answer starts at the last position from which the span reads as the answer alone, then EOS
        answer = data[item.sample_id]["answer"]
        start = max(a for a in range(len(span)) if processor.tokenizer.decode(span[a:], skip_special_tokens=True).strip() == answer)
        assert item.logits.pos.tolist() == list(range(start - 1, len(span) - 1)), item.sample_id
        rows = logits[start - 1:-1]
        torch.testing.assert_close(torch.from_numpy(item.logits.lse), rows.logsumexp(-1), rtol=1e-5, atol=1e-5)
        if setting == "full":
            assert item.logits.ids is None
            torch.testing.assert_close(item.logits.values, rows, rtol=1e-5, atol=1e-5)
        else:
            top = rows.sort(dim=-1, descending=True)
            assert item.logits.ids.tolist() == top.indices[:, :5].tolist(), item.sample_id
            torch.testing.assert_close(item.logits.values, top.values[:, :5], rtol=1e-5, atol=1e-5)
    assert json.load(open(os.path.join(cfg.teacher.store, "manifest.json")))["fingerprint_fields"]["logits"] == setting


def test_live_shift_keeps_each_tokens_norm():
    """f + σ(α)·v, rescaled to ‖f‖ per token: by hand on one token, then through the toy model's MLP outputs."""
    from stages.methods.live import LiveVectors, attach
    live = LiveVectors(2, 3)
    with torch.no_grad():
        live.vector_ld.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        live.alpha_l.zero_()  # σ(0) = 1/2
    f = torch.tensor([[[3.0, 4.0, 0.0]]], dtype=torch.float64)
    # layer 0: f + v/2 = (4, 4, 0), of norm 4√2; rescaled to ‖f‖ = 5: (5/√2, 5/√2, 0)
    torch.testing.assert_close(live.shift(0, f), torch.tensor([[[5 / 2 ** 0.5, 5 / 2 ** 0.5, 0.0]]], dtype=torch.float64))

    lm = load_model(model_dpath(), dtype="float64")
    seen = {}
    layers = lm.adapter.decoder_layers(lm.model)
    for i, layer in enumerate(layers):  # registered before LIVE's hook: the MLP's own output
        layer.mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("f", i), out))
    live = LiveVectors(lm.dims.n_layers, lm.dims.d_model).double()
    with torch.no_grad():
        live.vector_ld.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    attach(lm, live)
    for i, layer in enumerate(layers):  # registered after: what the layer adds to the residual stream
        layer.mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("live", i), out))
    from tests.test_variants import _one_input
    with torch.no_grad():
        lm.model(**_one_input(lm))
    for i in range(len(layers)):
        f, shifted = seen[("f", i)], seen[("live", i)]
        torch.testing.assert_close(shifted.norm(dim=-1), f.norm(dim=-1), rtol=1e-12, atol=1e-12)
        assert (shifted - f).abs().max() > 1e-3, "the shift should change the direction"


def test_live_refuses_a_store_without_logits_in_one_line(tmp_path):
    from stages import student, teacher
    cfg = _config(tmp_path)
    teacher.run(cfg)
    with pytest.raises(UserError) as e:
        student.run(_config(tmp_path, "student.method=live"))
    message = str(e.value)
    assert "\n" not in message and "has none" in message, message
    assert "logits" not in json.load(open(os.path.join(cfg.teacher.store, "manifest.json")))["fingerprint_fields"]
    assert "`pipeline run teacher --shots 2 --store NEW_PATH --set teacher.logits=topk:64`" in message, message


@pytest.mark.parametrize("value", ["topk:0", "topk:x", "top:5", "topk:05", "all"])
def test_a_logits_setting_that_is_none_of_off_topk_full_is_refused(value):
    with pytest.raises(UserError, match=r"teacher.logits: .* is not one of off, topk:K \(K >= 1, e.g. topk:64\), full"):
        load_config(None, [f"teacher.logits={value}"])


def _env(tmp):
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # MIMIC_PIPELINE_HOME: the test's own


def test_live_trains_saves_reloads_and_evaluates(tmp_path):
    """`pipeline run student --method live` on a top-k store: it logs the KL and L_gt it trains on, saves the vectors
    and scales, `pipeline eval --mode trained` evaluates them, and a fresh load reproduces that evaluation; the
    reloaded model runs with the saved values, and `pipeline analyze l2` measures it."""
    from stages import evaluate
    from stages.analyze import l2
    from stages.methods import load_artifact
    from stages.methods.live import FNAME
    common = ["--set", f"run_dir={tmp_path}", "--set", "task.num_queries=16", "--set", "teacher.shard_size=8",
              "--set", "eval.num_samples=8", "--shots", "4"]
    for cmd in (["run", "teacher", *common, "--set", "teacher.logits=topk:8"],
                ["run", "student", *common, "--epochs", "1", "--method", "live"]):
        out = subprocess.run(PIPELINE + cmd, env=_env(tmp_path), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "student-vqav2-4shot-live"
    assert json.load(open(run / "method.json"))["method"] == "live"
    rows = [json.loads(line) for line in open(run / "losses.jsonl")]
    assert len(rows) == 4 and all(r["l_kl"] > 0 for r in rows)
    for r in rows:  # KL at weight 1 and w_ce·L_gt; L_align is measured, not trained on
        assert r["loss"] == pytest.approx(r["l_kl"] + 0.5 * r["l_gt"], rel=1e-5), r

    first = subprocess.run(PIPELINE + ["eval", "--mode", "trained", "--student", str(run), *common[:8]],
                           env=_env(tmp_path), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    written = tmp_path / f"eval-trained-{run.name}-vqav2"
    metrics = json.load(open(written / "metrics.json"))
    assert metrics["method"] == "live" and metrics["n"] == 8
    cfg = resolve(load_config(None, [f"run_dir={tmp_path}", "task.num_queries=16", "eval.num_samples=8",
                                     "teacher.shots=4", "eval.mode=trained", f"eval.student={run}",
                                     f"eval.out={tmp_path}/again"]))
    again = evaluate.run(cfg)
    assert again["vqa_accuracy"] == metrics["vqa_accuracy"]
    assert open(written / "predictions.jsonl").read() == open(tmp_path / "again" / "predictions.jsonl").read()

    saved = load_file(run / "live" / FNAME)
    assert set(saved) == {"vector_ld", "alpha_l"} and saved["vector_ld"].shape == (4, 128)
    assert (saved["alpha_l"] != 0).all(), "the scales train (they start at 0)"
    lm = load_model(model_dpath())
    from tests.test_variants import _one_input
    inputs = _one_input(lm)
    base = lm.model(**inputs).logits
    captured = {}
    layer = lm.adapter.decoder_layers(lm.model)[1]
    layer.mlp.register_forward_hook(lambda m, a, out: captured.__setitem__("f", out))
    load_artifact(str(run), lm)
    layer.mlp.register_forward_hook(lambda m, a, out: captured.__setitem__("live", out))
    assert (lm.model(**inputs).logits - base).abs().max() > 1e-4, "the artifact should change the model"
    f = captured["f"]  # the saved values are what the reloaded model adds
    expected = f + torch.sigmoid(saved["alpha_l"][1]) * saved["vector_ld"][1]
    expected = expected * f.norm(dim=-1, keepdim=True) / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(captured["live"], expected, rtol=1e-5, atol=1e-6)

    # through the public API: the vectors follow the model's dtype, and heads_off gives the base model exactly
    from stages.api import heads_off, load_with_heads
    model, _ = load_with_heads(model_dpath(), str(run))
    with_live = model(**inputs).logits
    torch.testing.assert_close(with_live, lm.model(**inputs).logits, rtol=0, atol=0)
    with heads_off(model):
        torch.testing.assert_close(model(**inputs).logits, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(**inputs).logits, with_live, rtol=0, atol=0)
    model.to(torch.float64)
    assert {p.dtype for p in model.live_vectors.parameters()} == {torch.float64}
    torch.testing.assert_close(model(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits,
                               with_live.double(), rtol=1e-4, atol=1e-4)

    result = l2(load_config(str(run / "config.json"), ["eval.num_samples=8"]), [str(run)], str(tmp_path / "l2"))
    assert list(result["l2_per_layer"]) == ["zero-shot", f"live, without L_align ({run.name})"]
    assert result["l2_per_layer"][f"live, without L_align ({run.name})"] != result["l2_per_layer"]["zero-shot"]


def test_kl_is_teacher_to_student_with_the_top_k_tail_as_one_outcome():
    """KL(teacher ‖ student) per row, written out with plain floats: over the whole vocabulary for a full store; over
    the teacher's K tokens and one "rest" outcome (1 − their mass, for both) for a top-k one."""
    import math

    from stages.methods.live import kl_rows
    from storage.writer import Logits
    g = torch.Generator().manual_seed(0)
    teacher_z, student_z = torch.randn(2, 6, generator=g, dtype=torch.float64) * 2, torch.randn(2, 6, generator=g, dtype=torch.float64)
    lse = teacher_z.logsumexp(-1)

    def probs(z):
        e = [math.exp(x) for x in z]
        return [x / sum(e) for x in e]

    full = kl_rows(student_z, Logits(pos=None, values=teacher_z, lse=lse.numpy()))
    top = teacher_z.topk(2, dim=-1)
    topk = kl_rows(student_z, Logits(pos=None, values=top.values, lse=lse.numpy(), ids=top.indices.numpy()))
    for row in range(2):
        p, q = probs(teacher_z[row].tolist()), probs(student_z[row].tolist())
        assert full[row].item() == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel=1e-6)  # computed in float32
        ids = top.indices[row].tolist()
        p_rest, q_rest = 1 - sum(p[i] for i in ids), 1 - sum(q[i] for i in ids)
        expected = sum(p[i] * math.log(p[i] / q[i]) for i in ids) + p_rest * math.log(p_rest / q_rest)
        assert topk[row].item() == pytest.approx(expected, rel=1e-6)
