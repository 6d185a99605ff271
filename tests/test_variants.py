"""The paper's variants and baselines (METHOD.md §5, issue 17): MimIC's ablations pinned by their math, LoRA and
LoRA† by what they adapt, and every method trained, saved, reloaded and evaluated from one store."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from stages.models import heads as heads_module
from stages.models import load_model
from stages.models.heads import MimicHeads, mimic_attention
from stages.tasks.toy_icl import model_dpath
from tests.conftest import random_image

PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def _attention(q, k, v, visible):
    """softmax(s·q·kᵀ) v over the visible keys, written out (float64)."""
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * q.shape[-1] ** -0.5
    weights = scores.exp() * visible
    return (weights / weights.sum(-1, keepdim=True)) @ v


def _run_heads(module, heads, q, k, v, mask, layer=0):
    heads_module._ATTACHED[module] = (heads, layer)
    try:
        return mimic_attention(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0].transpose(1, 2)  # [b,h,t,d]
    finally:
        heads_module._ATTACHED.pop(module)


def _case(dims, b=2, c=5, t=4, seed=0):
    """Random float64 queries, keys and values over [context; query] with causal + padding masks (row 1 padded)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, dims.n_heads, t, dims.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(b, dims.n_heads, c + t, dims.head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(b, dims.n_heads, c + t, dims.head_dim, generator=g, dtype=torch.float64)
    valid = torch.ones(b, c + t, dtype=torch.bool)
    valid[1, :2] = False
    valid[1, c] = False
    visible = torch.ones(t, c + t, dtype=torch.bool).tril(c)[None, None] & valid[:, None, None, :]
    return q, k, v, visible, c


@pytest.mark.parametrize("shift", ["vector", "linear"])
def test_interpolated_form_with_exact_h_and_mu_equals_attention_over_demonstrations(shift):
    """Seed Eq. 6 in float64: with h := SA(q, K_D, V_D) and log Z1 := log Σ_{K_D} exp(s·q·k) in place of the learned
    ones, the heads' (1−μ)·SA(q,K,V) + μ·h equals attention over [demonstrations; query] at the query positions."""
    lm = load_model(model_dpath(), dtype="float64")
    module = lm.adapter.decoder_layers(lm.model)[0].self_attn
    q, k, v, visible, c = _case(lm.dims)
    s = q.shape[-1] ** -0.5
    context_visible = visible[..., :c]
    heads = MimicHeads(1, lm.dims.n_heads, lm.dims.head_dim, shift=shift).double()
    heads.h = lambda layer, query: _attention(query, k[:, :, :c], v[:, :, :c], context_visible)
    heads.log_z1 = lambda layer, query: torch.logsumexp(
        (torch.einsum("bhtd,bhcd->bhtc", query, k[:, :, :c]) * s).masked_fill(~context_visible, float("-inf")), -1)
    out = _run_heads(module, heads, q, k[:, :, c:], v[:, :, c:], visible[..., c:])
    reference = _attention(q, k, v, visible)
    for row, keep in ((0, slice(0, 4)), (1, slice(1, 4))):  # row 1's first query is padding
        torch.testing.assert_close(out[row, :, keep], reference[row, :, keep], rtol=1e-10, atol=1e-10)


def _hand_set(heads, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return heads


def _mu_through_the_heads(module, heads, q, k, v, mask, layer=0):
    """μ̃ per head and query as the model sees it: with shift = mimic the output is SA + μ̃·v, so μ̃ = (out − SA)·v / |v|²."""
    out = _run_heads(module, heads, q, k, v, mask, layer)
    sa = _attention(q, k, v, mask)
    shift_hd = heads.shift_lhd[layer].detach()
    return torch.einsum("bhtd,hd->bht", out - sa, shift_hd) / (shift_hd ** 2).sum(-1)[None, :, None]


def test_shared_mu_is_one_gate_per_layer():
    """student.mu=shared: one gate per layer (w ∈ R^{H·d_h}, b ∈ R per layer), the same μ̃ for every head of a query,
    σ(w·[q_1;…;q_H] + b − mean_h log Z2_h) as the authors' head-shared heads, and still a function of the query."""
    lm = load_model(model_dpath(), dtype="float64")
    module = lm.adapter.decoder_layers(lm.model)[0].self_attn
    n_layers, h, d = 3, lm.dims.n_heads, lm.dims.head_dim
    heads = _hand_set(MimicHeads(n_layers, h, d, mu="shared").double())
    gate_shapes = {name: tuple(p.shape) for name, p in heads.named_parameters() if name != "shift_lhd"}
    assert gate_shapes == {"weight_ld": (n_layers, h * d), "bias_l": (n_layers,)}
    q, k, v, visible, c = _case(lm.dims, c=0, t=5)
    layer = 2
    mu = _mu_through_the_heads(module, heads, q, k, v, visible, layer)
    real = [(0, slice(0, 5)), (1, slice(2, 5))]  # row 1: two padding positions
    for row, keep in real:
        torch.testing.assert_close(mu[row, :, keep], mu[row, :1, keep].expand(h, -1), rtol=1e-9, atol=1e-9)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * d ** -0.5
    log_z2 = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1).mean(1)  # [b, t]
    f = q.transpose(1, 2).reshape(2, 5, h * d) @ heads.weight_ld[layer].detach() + heads.bias_l[layer].detach()
    expected = torch.sigmoid(f - log_z2)
    for row, keep in real:
        torch.testing.assert_close(mu[row, 0, keep], expected[row, keep], rtol=1e-9, atol=1e-9)
    assert mu[0, 0].max() - mu[0, 0].min() > 0.05, "μ̃ should still depend on the query"


def test_constant_mu_does_not_change_with_the_query():
    """student.mu=constant: μ̃ = σ(b[l,h]) for any query and keys; the default gate, on the same two cases, does change."""
    lm = load_model(model_dpath(), dtype="float64")
    module = lm.adapter.decoder_layers(lm.model)[0].self_attn
    dims = lm.dims
    constant = _hand_set(MimicHeads(2, dims.n_heads, dims.head_dim, mu="constant").double())
    per_query = _hand_set(MimicHeads(2, dims.n_heads, dims.head_dim).double())
    cases = [_case(dims, c=0, t=5, seed=s) for s in (0, 7)]
    mus = {name: [_mu_through_the_heads(module, heads, q, k, v, vis, 1) for q, k, v, vis, _ in cases]
           for name, heads in (("constant", constant), ("query", per_query))}
    expected = torch.sigmoid(constant.bias_lh[1].detach())[None, :, None].expand(2, -1, 5)
    for mu in mus["constant"]:
        torch.testing.assert_close(mu[0], expected[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mu[1, :, 2:], expected[1, :, 2:], rtol=1e-9, atol=1e-9)  # row 1: 2 pads
    assert (mus["query"][0][0] - mus["query"][1][0]).abs().max() > 1e-2


# --- LoRA and LoRA†: what they adapt ---------------------------------------------------------------------------------

def _toy_config():
    return json.load(open(os.path.join(model_dpath(), "config.json")))


def _student_config(**student):
    from pipeline.config import load_config
    return load_config(None, [f"student.{k}={v}" for k, v in student.items()]).student


def _lora_params(lm):
    return {n: p for n, p in lm.model.named_parameters() if p.requires_grad}


def test_lora_dagger_changes_only_the_language_models_output_projections():
    """LoRA†: trainable weights only on W_o of the LM's self-attention, layers × (d + d) of them at r = 1 (d and the
    layer count read from the checkpoint's config here); with nonzero adapters the vision encoder's and the
    perceiver's outputs are unchanged and the LM's are not."""
    from stages.methods import METHODS
    text = _toy_config()["text_config"]
    lm = load_model(model_dpath())
    METHODS["lora-dagger"].add(lm, _student_config(method="lora-dagger"))
    params = _lora_params(lm)
    assert params and all(re.fullmatch(r"model\.text_model\.layers\.\d+\.self_attn\.o_proj\.lora_[AB]\.default\.weight", n)
                          for n in params), sorted(params)
    d, n_heads, head_dim = text["hidden_size"], text["num_attention_heads"], text["head_dim"]
    assert n_heads * head_dim == d  # W_o: R^d → R^d here, so r·(in + out) = d + d
    assert sum(p.numel() for p in params.values()) == text["num_hidden_layers"] * (d + d)

    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out))
             for name, m in (("vision", lm.model.model.vision_model), ("connector", lm.model.model.connector),
                             ("lm", lm.model.model.text_model))]
    inputs = _one_input(lm)
    with torch.no_grad():
        for p in params.values():  # LoRA's B starts at 0: make the adapters matter
            p.zero_()
        lm.model(**inputs)
        base = {k: (v.last_hidden_state if hasattr(v, "last_hidden_state") else v).clone() for k, v in seen.items()}
        for p in params.values():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        lm.model(**inputs)
    for h in hooks:
        h.remove()
    after = {k: (v.last_hidden_state if hasattr(v, "last_hidden_state") else v) for k, v in seen.items()}
    assert torch.equal(after["vision"], base["vision"]) and torch.equal(after["connector"], base["connector"])
    assert (after["lm"] - base["lm"]).abs().max() > 1e-3


def _one_input(lm):
    from stages.models.encode import encode
    from stages.tasks.prompts import build_prompt
    from stages.tasks.sample import Sample
    sample = Sample("0", b"", "What is it?", ("red",) * 10)
    return encode(lm, [build_prompt("vqa", "mimic", sample, [], load=lambda s: random_image(0, 16))]).inputs


def test_lora_adapts_every_attention_projection_vision_and_perceiver_included():
    """LoRA: r = 16 on W_q, W_k, W_v, W_o of the LM, the vision encoder (whose W_o is out_proj) and the perceiver,
    nothing else; the parameter count r·(in + out) per projection, from the checkpoint's config."""
    from stages.methods import METHODS
    config = _toy_config()
    text, vision, perceiver = config["text_config"], config["vision_config"], config["perceiver_config"]
    lm = load_model(model_dpath())
    METHODS["lora"].add(lm, _student_config(method="lora"))
    adapted = {n.split(".lora_")[0] for n in _lora_params(lm)}
    d, kv = text["hidden_size"], text["num_key_value_heads"] * text["head_dim"]
    shapes = {}  # module -> (in, out)
    for i in range(text["num_hidden_layers"]):
        for proj, io in (("q_proj", (d, d)), ("k_proj", (d, kv)), ("v_proj", (d, kv)), ("o_proj", (d, d))):
            shapes[f"model.text_model.layers.{i}.self_attn.{proj}"] = io
    dv = vision["hidden_size"]
    for i in range(vision["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"model.vision_model.encoder.layers.{i}.self_attn.{proj}"] = (dv, dv)
    dq = perceiver["resampler_n_heads"] * perceiver["resampler_head_dim"]
    dkv = perceiver["num_key_value_heads"] * perceiver["resampler_head_dim"]
    for i in range(perceiver["resampler_depth"]):
        for proj, io in (("q_proj", (d, dq)), ("k_proj", (d, dkv)), ("v_proj", (d, dkv)), ("o_proj", (dq, d))):
            shapes[f"model.connector.perceiver_resampler.layers.{i}.self_attn.{proj}"] = io
    assert adapted == set(shapes), sorted(adapted ^ set(shapes))
    assert sum(p.numel() for p in _lora_params(lm).values()) == sum(16 * (i + o) for i, o in shapes.values())


# --- every method from one store: train, save, reload, evaluate ------------------------------------------------------

METHOD_RUNS = {  # name -> extra student settings
    "mimic": [],
    "mimic-linear-mu_shared": ["--set", "student.shift=linear", "--set", "student.mu=shared"],
    "lora": ["--method", "lora"],
    "lora-dagger": ["--method", "lora-dagger", "--set", "student.w_align=0"],
    "mimic+lora": ["--method", "mimic+lora"],
}


def _env(tmp):
    return {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 4-shot store of 16 queries of the embedded default, and a student of every method trained 1 epoch from it."""
    tmp = tmp_path_factory.mktemp("variants")
    common = ["--set", f"run_dir={tmp}", "--set", "task.num_queries=16", "--set", "teacher.shard_size=8",
              "--set", "eval.num_samples=8", "--shots", "4"]
    out = subprocess.run(PIPELINE + ["run", "teacher", *common], env=_env(tmp), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = {}
    for name, extra in METHOD_RUNS.items():
        result = subprocess.run(PIPELINE + ["run", "student", *common, "--epochs", "1", *extra], env=_env(tmp),
                                capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        runs[name] = tmp / ("student-vqav2-4shot" + ("" if name == "mimic" else f"-{name}"))
        assert json.load(open(runs[name] / "method.json"))["method"] == name.split("-linear")[0]
    return tmp, common, runs


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_each_method_trains_saves_and_its_reloaded_artifact_reproduces_its_evaluation(trained, name, monkeypatch):
    """`pipeline eval --mode trained` on the run's directory, then the same evaluation in this process from a fresh
    load: the same predictions. The artifact holds its method's parts, and it changes the model's logits."""
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import evaluate
    from stages.methods import load_artifact
    tmp, common, runs = trained
    run = runs[name]
    first = subprocess.run(PIPELINE + ["eval", "--mode", "trained", "--student", str(run), *common[:8]],
                           env=_env(tmp), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    written = tmp / f"eval-trained-{run.name}-vqav2"
    metrics = json.load(open(written / "metrics.json"))
    assert metrics["method"] == json.load(open(run / "method.json"))["method"] and metrics["n"] == 8

    monkeypatch.setenv("MIMIC_PIPELINE_HOME", str(tmp / "home"))  # the embedded task the commands wrote
    cfg = resolve(load_config(None, [f"run_dir={tmp}", "task.num_queries=16", "eval.num_samples=8", "teacher.shots=4",
                                     "eval.mode=trained", f"eval.student={run}", f"eval.out={tmp}/again-{name}"]))
    again = evaluate.run(cfg)
    assert again["vqa_accuracy"] == metrics["vqa_accuracy"]
    assert (open(written / "predictions.jsonl").read() == open(tmp / f"again-{name}" / "predictions.jsonl").read())

    lm = load_model(model_dpath())
    inputs = _one_input(lm)
    base = lm.model(**inputs).logits
    load_artifact(str(run), lm)
    assert (lm.model(**inputs).logits - base).abs().max() > 1e-4, "the artifact should change the model"
    parts = [p for p in ("heads", "lora") if (run / p).is_dir()]
    assert parts == [p for p, present in (("heads", "mimic" in name), ("lora", "lora" in name)) if present]
    if "heads" in parts:  # every saved value is what the reloaded model runs with
        attached = heads_module._ATTACHED[lm.adapter.decoder_layers(lm.model)[0].self_attn][0].state_dict()
        saved = load_file(run / "heads" / "heads.safetensors")
        assert saved.keys() == attached.keys() and all(torch.equal(saved[k], attached[k]) for k in saved)
    if "lora" in parts:
        saved = load_file(run / "lora" / "adapter_model.safetensors")
        params = dict(lm.model.named_parameters())
        assert all(torch.equal(params[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())  # B starts at 0


def test_each_method_takes_its_weighted_losses(trained):
    """loss = w_align·L_align + w_ce·L_gt, row by row of losses.jsonl: 1 and 0.5 by default, 0 and 0.5 for the
    LoRA† run with student.w_align=0 (its L_align is still measured and logged)."""
    _, _, runs = trained
    for name, w_align in (("mimic", 1.0), ("lora", 1.0), ("mimic+lora", 1.0), ("lora-dagger", 0.0)):
        rows = [json.loads(line) for line in open(runs[name] / "losses.jsonl")]
        assert len(rows) == 4 and all(r["l_align"] > 0 for r in rows), name
        for r in rows:
            assert r["loss"] == pytest.approx(w_align * r["l_align"] + 0.5 * r["l_gt"], rel=1e-5), (name, r)


def test_mimic_plus_lora_goes_on_from_trained_heads(trained):
    """student.heads_from: MimIC + LoRA starts from a MimIC run's heads (the seed's one epoch on top); its two
    parameter groups train at their own learning rates (heads 5e-3, LoRA 5e-4)."""
    from stages.methods import METHODS
    tmp, common, runs = trained
    lm = load_model(model_dpath())
    s = _student_config(method="mimic+lora", heads_from=str(runs["mimic"] / "heads"))
    parts = METHODS["mimic+lora"].add(lm, s)
    start = load_file(runs["mimic"] / "heads" / "heads.safetensors")
    for name, p in parts["heads"].named_parameters():
        assert torch.equal(p.detach(), start[name]), name
    groups = METHODS["mimic+lora"].param_groups(parts, s)
    assert [g["lr"] for g in groups] == [5e-3, 5e-4]
    assert sum(p.numel() for p in groups[0]["params"]) == 4 * 4 * (2 * 32 + 1)
    assert all("lora_" in n for n, p in lm.model.named_parameters() if p.requires_grad)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in lm.model.parameters() if p.requires_grad}


def test_l2_analysis_measures_last_position_layer_outputs_against_icl(trained, tmp_path):
    """`pipeline analyze l2` (seed Tab. 11): per layer, the mean over held-out queries of the L2 distance between
    the decoder layer's output at the last prompt position with a run's artifact and with k-shot ICL; checked for
    the zero-shot row and the first layer against hidden states taken one query at a time (no padding)."""
    from pipeline.config import load_config
    from stages.analyze import l2
    from stages.models.encode import encode
    from stages.tasks import get_task
    from stages.tasks.pools import eval_queries, icd_pool, support_set, training_queries
    from stages.tasks.prompts import build_prompt, reference_answer
    from stages.tasks.sampler import sample_icds
    tmp, _, runs = trained
    cfg = load_config(str(runs["mimic"] / "config.json"), ["eval.num_samples=8"])
    result = l2(cfg, [str(runs["mimic"]), str(runs["lora-dagger"])], str(tmp_path / "l2"))
    assert {f.name for f in (tmp_path / "l2").iterdir()} == {"l2.json", "l2.md", "l2.png"}
    names = list(result["l2_per_layer"])
    assert names[0] == "zero-shot" and names[1].startswith("mimic, with L_align")
    assert names[2].startswith("lora-dagger, without L_align")
    assert all(len(v) == 4 for v in result["l2_per_layer"].values())

    tc, ev = cfg.task, cfg.eval
    task = get_task(tc.name)
    support = support_set(task, tc.root, tc.train_split, training_queries(task, tc.root, tc.train_split,
                                                                          tc.num_queries, seed=tc.seed), tc.support)
    queries = eval_queries(task, tc.root, tc.eval_split, 8, support, seed=tc.seed)
    by_id = {s.id: s for s in support}
    ids, answers = icd_pool(support, tc.answer)
    lm = load_model(cfg.model.path)

    def layer0_last(prompt):
        out = lm.model(**encode(lm, [prompt]).inputs, output_hidden_states=True)
        return out.hidden_states[1][0, -1]  # hidden_states[0] is the embedding, [1] the first layer's output

    distances = []
    with torch.no_grad():
        for q in queries:
            icds = [(by_id[i], reference_answer(by_id[i], tc.answer))
                    for i in sample_icds(ids, q.id, 4, seed=ev.seed, view=0, sampler=ev.sampler, answers=answers)]
            icl = layer0_last(build_prompt("vqa", "icl", q, icds))
            distances.append((layer0_last(build_prompt("vqa", "mimic", q, [])) - icl).norm().item())
    assert result["l2_per_layer"]["zero-shot"][0] == pytest.approx(sum(distances) / 8, rel=1e-4)
    assert result["l2_per_layer"][names[1]] != result["l2_per_layer"]["zero-shot"]


def test_run_all_evaluates_the_method_the_student_trained(pipeline):
    """`pipeline run all` with a LoRA method evaluates its artifact (--mode trained), not MimIC heads it has none of."""
    code, out, err = pipeline("run", "all", "--shots", "2", "--set", "student.method=lora-dagger",
                              "--set", "task.num_queries=8", "--set", "student.epochs=1", "--set", "eval.num_samples=4")
    assert code == 0, err[-2000:]
    last = out.strip().splitlines()[-1]
    assert "2-shot ICL" in last and "lora-dagger" in last and "MimIC" not in last, last
    assert '"mode": "trained"' in out and '"method": "lora-dagger"' in out


# --- the experiment: Tab. 8, 11 and 12 from one store -----------------------------------------------------------------

# name -> (method, shift, mu, w_align) that STUDENTS' overrides must give, written out from seed Tab. 8, 11 and 12
EXPECTED = {
    "mimic": ("mimic", "mimic", "query", 1.0), "linear": ("mimic", "linear", "query", 1.0),
    "vector": ("mimic", "vector", "query", 1.0), "mu_shared": ("mimic", "mimic", "shared", 1.0),
    "mu_constant": ("mimic", "mimic", "constant", 1.0), "lora": ("lora", "mimic", "query", 0.0),
    "lora_dagger": ("lora-dagger", "mimic", "query", 0.0), "lora_align": ("lora", "mimic", "query", 1.0),
    "lora_dagger_align": ("lora-dagger", "mimic", "query", 1.0), "mimic_lora": ("mimic+lora", "mimic", "query", 1.0),
    "live": ("live", "mimic", "query", 1.0),
}


@pytest.mark.parametrize("family", [(), ("--family", "attribute", "--task", "1")], ids=["default", "attribute"])
def test_variants_experiment_fills_its_tables_from_one_store_and_resumes(pipeline, tmp_path, one_thread, family):
    """`pipeline experiment variants` on a tiny setting: one teacher store, every student of Tab. 8, 11 and 12 with
    its own settings, each table cell the number its evaluation or the L2 analysis wrote, and a rerun redoes nothing.
    With --family, on that family's task with `experiment toy-icl`'s data and sampler."""
    out = tmp_path / "variants"
    command = ("experiment", "variants", "--out", out, *family, "--set", "task.num_queries=16",
               "--set", "teacher.shard_size=8", "--set", "eval.num_samples=8", "--set", "student.epochs=1")
    code, stdout, stderr = pipeline(*command)
    assert code == 0, stderr[-3000:]
    task = json.load(open(out / "student-mimic" / "config.json"))["task"]
    if family:  # toy-icl's data of attribute task 1 (size), under --out, and its cover sampler
        assert task["root"] == str(out / "data" / "attribute1") and task["support"] == "train"
        assert json.load(open(out / "data" / "attribute1" / "toy_attribute.json"))["task"] == "size"
        assert json.load(open(out / "student-mimic" / "config.json"))["teacher"]["sampler"] == "cover"
    else:
        assert task["root"].endswith("toy-icl-0")
    assert stdout.count("shards to write") == 1, stdout  # one teacher run, one store
    assert [d.name for d in out.iterdir() if (d / "manifest.json").is_file()] == ["store-vqav2-8shot"]

    for name, (method, shift, mu, w_align) in EXPECTED.items():
        student = json.load(open(out / f"student-{name}" / "config.json"))["student"]
        assert json.load(open(out / f"student-{name}" / "method.json"))["method"] == method, name
        assert (student["shift"], student["mu"], student["w_align"]) == (shift, mu, w_align), (name, student)
    mimic_lora = json.load(open(out / "student-mimic_lora" / "config.json"))["student"]
    assert (mimic_lora["heads_from"], mimic_lora["epochs"]) == (str(out / "student-mimic" / "heads"), 1)

    # Each accuracy is the one its evaluation wrote, found by what that evaluation evaluated.
    results = json.load(open(out / "results.json"))
    evaluations = {}
    for metrics in out.glob("eval-*/metrics.json"):
        ev = json.load(open(metrics.parent / "config.json"))["eval"]
        key = ("icl" if ev["mode"] == "icl" else "zero-shot" if ev["mode"] == "zero-shot"
               else os.path.basename(ev["student"]).removeprefix("student-"))
        evaluations[key] = json.load(open(metrics))["vqa_accuracy"]
    assert set(evaluations) == {"zero-shot", "icl", *EXPECTED}
    assert results["accuracy"] == evaluations

    # Tab. 11's L2 column: the mean over layers of l2.json's row for the run's directory.
    l2 = json.load(open(out / "l2" / "l2.json"))
    by_dir = {run: values for label, values in l2["l2_per_layer"].items() if (run := l2["runs"][label])}
    assert set(by_dir) == {str(out / f"student-{n}") for n in
                           ("lora_dagger", "lora", "lora_dagger_align", "lora_align", "mimic", "live")}
    for run, values in by_dir.items():
        assert results["mean_l2"][os.path.basename(run).removeprefix("student-")] == pytest.approx(
            sum(values) / len(values))

    table = open(out / "results.md").read()
    assert f"| with L_align: LoRA | {results['mean_l2']['lora_align']:.2f} | {evaluations['lora_align']:.1f} |" in table
    assert f"| μ independent of the query | {evaluations['mu_constant']:.1f} |" in table
    assert f"| MimIC + LoRA (1 epoch on the MimIC heads) | {evaluations['mimic_lora']:.1f} |" in table

    artifacts = {p: p.stat().st_mtime_ns for p in [*out.glob("student-*/**/*.safetensors"),
                                                   *out.glob("eval-*/metrics.json"), out / "l2" / "l2.json"]}
    code, stdout, stderr = pipeline(*command)
    assert code == 0, stderr[-3000:]
    assert "shards to write" not in stdout  # the store is not even opened: every result is in
    assert {p: p.stat().st_mtime_ns for p in artifacts} == artifacts
    assert json.load(open(out / "results.json"))["accuracy"] == evaluations
