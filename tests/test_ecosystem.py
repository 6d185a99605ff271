"""Issue 22: a trained artifact as an ordinary transformers model (stages.api), its model card, the report's plots,
per-layer L_align and TensorBoard logging. Device: CPU here; moving to CUDA is checked only where CUDA exists."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.errors import UserError
from stages.models import load_model
from stages.tasks.toy_icl import model_dpath

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
COMMON = ["--set", "task.num_queries=16", "--set", "teacher.shard_size=8", "--shots", "4"]


def _pipeline(args, tmp, check=True):
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(PIPELINE + args, cwd=tmp, env=env, capture_output=True, text=True)
    assert not check or out.returncode == 0, (args, out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default with a 4-shot store of 16 queries; a MimIC student (1 epoch, TensorBoard on) in the
    directory `pipeline run all` would use, runs/student-vqav2-32shot, and a MimIC + LoRA student."""
    tmp = tmp_path_factory.mktemp("ecosystem")
    _pipeline(["run", "teacher", *COMMON], tmp)
    _pipeline(["run", "student", *COMMON, "--epochs", "1", "--set", "student.out=runs/student-vqav2-32shot",
               "--set", "student.log=tensorboard"], tmp)
    _pipeline(["run", "student", *COMMON, "--epochs", "1", "--method", "mimic+lora"], tmp)
    return tmp, {"mimic": tmp / "runs" / "student-vqav2-32shot", "mimic+lora": tmp / "runs" / "student-vqav2-4shot-mimic+lora"}


def _readme_example() -> str:
    section = open(README).read().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_verbatim_and_reproduces_pipeline_eval(trained, monkeypatch):
    """The README's Python block, as written, on the embedded default: its answers are `pipeline eval --mode mimic`'s
    predictions for the same questions, and taking the heads off changes at least the logits."""
    tmp, runs = trained
    _pipeline(["eval", "--mode", "mimic", "--heads", "runs/student-vqav2-32shot/heads", "--num-samples", "0"], tmp)
    predictions = {json.loads(line)["id"]: json.loads(line)["prediction"]
                   for line in open(tmp / "runs" / "eval-mimic-vqav2" / "predictions.jsonl")}
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MIMIC_PIPELINE_HOME", str(tmp / "home"))
    namespace = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    questions, answers = namespace["questions"], namespace["answers"]
    assert len(answers) == len(questions) == 8
    inputs, tok = namespace["inputs"], namespace["processor"].tokenizer
    for ids, mask, q in zip(inputs["input_ids"], inputs["attention_mask"], questions):  # [BOS] + query (METHOD.md §6)
        text = tok.decode(ids[mask.bool()])
        assert text.startswith(tok.bos_token + "Image:") and text.endswith(f" Question: {q['question']} Answer:"), text
    assert answers == [predictions[str(q["question_id"])] for q in questions]
    assert len(namespace["base"]) == 8


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _toy_inputs(model, processor):
    from stages.api import prompt_inputs
    from tests.conftest import random_image
    return prompt_inputs(model, processor, [random_image(0, 16), random_image(1, 16)], ["What is it?"] * 2)


def test_artifact_follows_the_models_dtype_comes_off_and_is_saved(trained, tmp_path):
    """MimIC + LoRA through load_with_heads: the heads are a submodule, so .to(float64) and .to(bfloat16) cast them
    and the model still runs with them; heads_off gives the base model's logits exactly (a fresh load, no artifact)
    and puts the artifact back after; save_pretrained writes the heads' and LoRA's trained values."""
    from stages.api import heads_off, load_with_heads
    _, runs = trained
    model, processor = load_with_heads(model_dpath(), str(runs["mimic+lora"]))
    inputs = _toy_inputs(model, processor)
    base = load_model(model_dpath()).model
    with_artifact, without = _logits(model, inputs), _logits(base, inputs)
    assert (with_artifact - without).abs().max() > 1e-4, "the artifact should change the logits"
    with heads_off(model):
        torch.testing.assert_close(_logits(model, inputs), without, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, inputs), with_artifact, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())

    saved_heads = load_file(runs["mimic+lora"] / "heads" / "heads.safetensors")
    model.to(torch.float64)
    assert {n: p.dtype for n, p in model.mimic_heads.named_parameters()} == {n: torch.float64 for n in saved_heads}
    torch.testing.assert_close(_logits(model, inputs), with_artifact, rtol=1e-4, atol=1e-4)
    with heads_off(model):  # in float64 too, the artifact is what makes the difference
        torch.testing.assert_close(_logits(model, inputs), without, rtol=1e-4, atol=1e-4)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.mimic_heads.parameters())
    with_bf16 = _logits(model, inputs)
    with heads_off(model):
        assert (with_bf16 - _logits(model, inputs)).abs().max() > 0, "the bf16 heads should still be attached"

    model.to(torch.float32).save_pretrained(tmp_path / "saved")
    written = load_file(tmp_path / "saved" / "model.safetensors")
    for name, value in saved_heads.items():
        torch.testing.assert_close(written[f"mimic_heads.{name}"], value.to(torch.bfloat16).float())  # via bf16
    lora = load_file(runs["mimic+lora"] / "lora" / "adapter_model.safetensors")
    assert all(k.replace(".weight", ".default.weight") in written for k in lora)

    before = _logits(model, inputs)
    with torch.no_grad():  # model.mimic_heads is the module the attention runs with, not a copy
        model.mimic_heads.shift_lhd.add_(1.0)
    assert (_logits(model, inputs) - before).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_artifact_follows_the_model_to_cuda(trained):
    """model.to("cuda"): the heads move with it, and generation gives the CPU's answers."""
    from stages.api import decode, generation_kwargs, load_with_heads
    _, runs = trained
    model, processor = load_with_heads(model_dpath(), str(runs["mimic"]))
    inputs = _toy_inputs(model, processor)
    on_cpu = decode(processor, model.generate(**inputs, **generation_kwargs(processor)), inputs)
    model.to("cuda")
    assert all(p.device.type == "cuda" for p in model.mimic_heads.parameters())
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    assert decode(processor, model.generate(**inputs, **generation_kwargs(processor)), inputs) == on_cpu


def test_refuses_an_artifact_of_another_base_model(trained, tmp_path):
    """The same toy checkpoint copied elsewhere loads the artifact; a copy with one weight changed (same config and
    shapes, so the heads would fit) is refused in one line naming both models, by the Python API and by
    `pipeline eval` in both modes that load an artifact."""
    from stages.api import load_with_heads
    tmp, runs = trained
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(model_dpath(), same)
    shutil.copytree(model_dpath(), other)
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    load_with_heads(str(same), str(runs["mimic"]))
    with pytest.raises(UserError) as e:
        load_with_heads(str(other), str(runs["mimic"]))
    message = str(e.value)
    assert "\n" not in message and model_dpath() in message and str(other) in message, message
    for mode in (["--mode", "mimic", "--heads", f"{runs['mimic']}/heads"], ["--mode", "trained", "--student", str(runs["mimic+lora"])]):
        out = _pipeline(["eval", *mode, "--num-samples", "4", "--set", f"model.path={other}",
                         "--set", f"eval.out={tmp_path / 'eval'}"], tmp, check=False)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode != 0 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
        assert "trained on base model" in errors[0] and str(other) in errors[0], errors
        assert not os.path.exists(tmp_path / "eval" / "metrics.json")


def _front_matter(fpath):
    text = open(fpath).read()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4: text.index("\n---\n", 4)])


def test_student_writes_a_model_card_with_every_field_and_eval_adds_its_metrics(trained, tmp_path, monkeypatch):
    """README.md next to the artifact: HF front matter with the base model (revision, hashes computed here), task,
    split, training queries, shots, sampler, seeds, the store's fingerprint, the training config and final losses
    as the run's own files say, an empty licence; an evaluation adds its metrics; a licence the user set is kept;
    the directory still loads."""
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import evaluate
    from stages.api import load_with_heads
    from storage.reader import open_manifest
    tmp, runs = trained
    run = tmp_path / "student"
    shutil.copytree(runs["mimic"], run)
    card = _front_matter(run / "README.md")
    assert "license" in card and card["license"] is None
    assert card["base_model"] == model_dpath() and card["base_model_revision"] is None
    m = card["mimic"]
    assert m["base_model"]["weights_sha256"] == hashlib.sha256(open(os.path.join(model_dpath(), "model.safetensors"), "rb").read()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", m["base_model"]["config_sha256"]) and m["base_model"]["family"] == "idefics2"
    assert (m["method"], m["task"], m["split"], m["train_queries"], m["shots"], m["sampler"], m["teacher_seed"],
            m["task_seed"]) == ("mimic", "vqav2", "train", 16, 4, "uniform", 0, 3407)
    assert m["store_fingerprint"] == open_manifest(str(tmp / "runs" / "store-vqav2-4shot")).fingerprint
    assert m["training"] == json.load(open(run / "config.json"))["student"]
    last = json.loads(open(run / "losses.jsonl").read().splitlines()[-1])
    assert {k: m["final_losses"][k] for k in ("step", "loss", "l_align", "l_gt", "lr")} == \
        {k: last[k] for k in ("step", "loss", "l_align", "l_gt", "lr")}
    assert "load_with_heads" in open(run / "README.md").read()

    text = open(run / "README.md").read()
    with open(run / "README.md", "w") as f:  # the user fills in the licence
        f.write(text.replace("license:   # yours to set, e.g. apache-2.0", "license: mit", 1))
    monkeypatch.setenv("MIMIC_PIPELINE_HOME", str(tmp / "home"))
    cfg = resolve(load_config(None, [f"run_dir={tmp_path}", "eval.mode=trained", f"eval.student={run}",
                                     "eval.num_samples=8"]))
    metrics = evaluate.run(cfg)
    card = _front_matter(run / "README.md")
    assert card["license"] == "mit"
    assert card["mimic"]["evaluations"]["trained-vqav2-val"] == {**metrics, "split": "val"}
    # (other tests may have evaluated the run before it was copied: their results are there too)
    [metric] = [m for r in card["model-index"][0]["results"] for m in r["metrics"] if m["name"].startswith("trained-")]
    assert metric["type"] == "vqa_accuracy" and metric["value"] == metrics["vqa_accuracy"]
    model, _ = load_with_heads(model_dpath(), str(run))
    assert hasattr(model, "mimic_heads")


def test_align_returns_l_align_per_layer(trained, tmp_path, monkeypatch):
    """`eval --mode align` on a held-out store: per decoder layer, the MSE of the layer's FFN output to the stored
    target over span tokens and dims, against a reference computed here with forward hooks; their mean is L_align."""
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import evaluate
    from stages.models.heads import attach, load_heads
    from stages.batches import make_batch
    from stages.tasks import get_task
    from storage.reader import read_items
    tmp, runs = trained
    held = ["--set", "task.query_split=val", "--set", "task.support=train"]
    _pipeline(["run", "teacher", *COMMON, *held, "--store", str(tmp_path / "heldout")], tmp)
    monkeypatch.setenv("MIMIC_PIPELINE_HOME", str(tmp / "home"))
    cfg = resolve(load_config(None, ["task.num_queries=16", "teacher.shots=4", "task.query_split=val", "task.support=train",
                                     f"teacher.store={tmp_path / 'heldout'}", "eval.mode=align",
                                     f"eval.heads={runs['mimic'] / 'heads'}", f"eval.out={tmp_path / 'align'}"]))
    metrics = evaluate.run(cfg)
    for which in ("init", "trained"):
        per_layer = metrics[f"l_align_per_layer_{which}"]
        assert len(per_layer) == 4
        assert sum(per_layer) / 4 == pytest.approx(metrics[f"l_align_{which}"], rel=1e-5)

    lm = load_model(model_dpath())
    attach(lm, load_heads(str(runs["mimic"] / "heads"), lm))
    samples = {s.id: s for s in get_task("vqav2").load(cfg.task.root, "val")}
    items = list(read_items(str(tmp_path / "heldout")))
    outputs = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))]
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for lo in range(0, len(items), 4):  # align_loss's batches: the mean of each is over its span tokens
            batch = items[lo: lo + 4]
            inputs, target, span_mask, _ = make_batch(lm, batch, [[samples[it.sample_id].load_image()] for it in batch])
            lm.model(**inputs)
            for i in range(4):
                sq = ((outputs[i].double() - target[:, :, i].double()) ** 2).sum(-1)  # [b, t]
                sums[i] += (sq * span_mask).sum() / span_mask.sum() / target.shape[-1] * len(batch)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(torch.tensor(metrics["l_align_per_layer_trained"], dtype=torch.float64),
                               sums / len(items), rtol=1e-5, atol=0)


def test_report_draws_training_align_and_evaluation_plots(trained, tmp_path):
    """`pipeline report RUN_DIR` on a run directory holding a student, an align evaluation (hand-made per-layer
    values) and two evaluations: one PNG each, and report.md naming each evaluation with its value."""
    tmp, runs = trained
    run_dir = tmp_path / "runs"
    shutil.copytree(runs["mimic"], run_dir / "student-vqav2-32shot")
    evals = {"eval-zero-shot-vqav2": {"task": "vqav2", "mode": "zero-shot", "shots": 0, "n": 8, "vqa_accuracy": 12.5},
             "eval-mimic-vqav2": {"task": "vqav2", "mode": "mimic", "shots": 0, "n": 8, "vqa_accuracy": 87.5},
             "eval-align-vqav2": {"store": "runs/heldout", "heads": "h", "n": 16, "l_align_init": 2.5,
                                  "l_align_trained": 1.25, "l_align_ratio": 0.5, "l_align_per_layer_init": [1, 2, 3, 4],
                                  "l_align_per_layer_trained": [0.5, 1, 1.5, 2]}}
    for name, metrics in evals.items():
        (run_dir / name).mkdir()
        json.dump(metrics, open(run_dir / name / "metrics.json", "w"))
    _pipeline(["report", str(run_dir)], tmp)
    out = run_dir / "report"
    pngs = {"training-student-vqav2-32shot.png", "align-eval-align-vqav2.png", "evaluations.png"}
    assert {f.name for f in out.iterdir()} == pngs | {"report.md"}
    for name in pngs:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 300, name
    md = open(out / "report.md").read()
    assert "| eval-zero-shot-vqav2 | zero-shot | 8 | vqa_accuracy | 12.50 |" in md
    assert "| eval-mimic-vqav2 | mimic | 8 | vqa_accuracy | 87.50 |" in md
    assert "fresh heads 2.5, trained 1.25 (ratio 0.500)" in md
    assert all(f"]({name})" in md for name in pngs)


def test_tensorboard_logs_the_losses_and_lr_of_every_step(trained):
    """student.log=tensorboard: the event file holds the same per-step values as losses.jsonl, read back with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, runs = trained
    acc = EventAccumulator(str(runs["mimic"] / "tensorboard"))
    acc.Reload()
    rows = [json.loads(line) for line in open(runs["mimic"] / "losses.jsonl")]
    for key in ("loss", "l_align", "l_gt", "lr"):
        events = acc.Scalars(f"student/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key
