"""The teacher-free baselines of [compare] and training on a store's first N queries (student.num_queries):
virtual-kv's attention against softmax written out, both methods on every family's real forward and generate, prompt
tuning's L_align and L_gt lined up by hand, both methods trained, saved, reloaded and evaluated, and the first-N
filter of the reader and of the student."""
import json
import os

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.defaults import resolve
from stages.errors import UserError
from stages.methods import METHODS
from stages.models import heads as heads_module
from stages.models import load_model
from stages.models.encode import inputs_from_spans
from stages.models.heads import mimic_attention
from stages.methods.virtual_kv import VirtualKV
from storage.reader import TargetReader
from tests.conftest import FAMILIES, random_image
from tests.test_storage import assert_same_item
from tests.test_storage_reader import SKIPPED, keys, store  # noqa: F401  (store: the reader tests' fixture)

TEACHER_FREE = ("prompt-tuning", "virtual-kv")


def _randomised(part, seed=0, scale=0.5):
    """`part` with every parameter drawn afresh, so that none is 0 (virtual-kv's values start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in part.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return part


def _student_config(**student):
    return load_config(None, [f"student.{k}={v}" for k, v in student.items()]).student


# --- virtual-kv: softmax attention over [virtual keys; real keys] ------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_virtual_kv_output_is_softmax_over_virtual_and_real_keys(family, model_dirs):
    """Through the attention registry on each family's decoder self-attention (grouped-query heads included): the
    output is plain softmax attention over the head's n virtual keys (K = A_k B_k, V = A_v B_v) and the real keys,
    the virtual ones visible to every query and never masked, the real ones under the causal and padding mask. Row 1
    is left-padded by two; its padding queries see the virtual keys alone."""
    lm = load_model(model_dirs[family], dtype="float64")
    module, dims = lm.adapter.decoder_layers(lm.model)[1].self_attn, lm.dims
    b, t, layer = 2, 5, 1
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, dims.n_heads, t, dims.head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, dims.n_kv_heads, t, dims.head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :2] = False
    visible = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]  # [b, 1, t, t]
    pairs = _randomised(VirtualKV(2, dims.n_heads, dims.head_dim, module.scaling).double())
    heads_module._ATTACHED[module] = (pairs, layer)
    try:
        out = mimic_attention(module, q, k, v, visible, scaling=module.scaling)[0].transpose(1, 2)  # [b, h, t, d]
    finally:
        heads_module._ATTACHED.pop(module)

    with torch.no_grad():
        virtual_k = pairs.key_a_lhnr[layer] @ pairs.key_b_lhrd[layer]  # [h, n, d]
        virtual_v = pairs.value_a_lhnr[layer] @ pairs.value_b_lhrd[layer]
    n, rep = virtual_k.shape[1], dims.n_heads // dims.n_kv_heads
    keys_all = torch.cat([virtual_k.expand(b, -1, -1, -1), k.repeat_interleave(rep, dim=1)], dim=2)
    values_all = torch.cat([virtual_v.expand(b, -1, -1, -1), v.repeat_interleave(rep, dim=1)], dim=2)
    seen = torch.cat([torch.ones(b, 1, t, n, dtype=torch.bool), visible], dim=-1)
    scores = (q @ keys_all.transpose(-1, -2) * dims.head_dim ** -0.5).masked_fill(~seen, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ values_all
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)  # padding queries included
    without = mimic_attention(module, q, k, v, visible, scaling=module.scaling)[0].transpose(1, 2)  # nothing attached
    assert (out[0] - without[0]).abs().max() > 0.1, "the virtual pairs should change the output"


# --- both methods on every family's real forward and generate -----------------------------------------------------

def _span_rows(lm, words=("red", "green blue")):
    """Two spans (query + answer) of different lengths with an image each: a left-padded batch."""
    image = lm.adapter.image_text(lm.processor)
    texts = [f"{image}Question: what color is the shape? Answer: {w}" for w in words]
    spans = [lm.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return spans, [[random_image(i)] for i in range(len(spans))]


def _generate(lm, inputs):
    from stages.evaluate import generation_kwargs
    inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    out = lm.model.generate(**inputs, **generation_kwargs(lm.tokenizer, max_new_tokens=3, num_beams=3))
    return out[:, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("method", TEACHER_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_method_keeps_a_padded_row_equal_to_the_row_alone(family, method, model_dirs):
    """The part changes the model; a left-padded row's logits and 3-beam generation equal those of the row alone;
    heads_off gives the base model's logits exactly (inputs built inside the block: prompt tuning's have no virtual
    tokens there, and inputs holding them are refused with a message)."""
    from stages.api import heads_off
    lm = load_model(model_dirs[family], dtype="float64")
    spans, images = _span_rows(lm)
    with torch.no_grad():
        base = lm.model(**inputs_from_spans(lm, spans, images)).logits
        _randomised(next(iter(METHODS[method].add(lm, _student_config(method=method)).values())), scale=0.1)
        batch = inputs_from_spans(lm, spans, images)
        logits = lm.model(**batch).logits
        for row, (span, image) in enumerate(zip(spans, images)):
            alone = inputs_from_spans(lm, [span], [image])
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, -n:], lm.model(**alone).logits[0], rtol=1e-9, atol=1e-9)
        padded = min(range(len(spans)), key=lambda row: len(spans[row]))
        alone = _generate(lm, inputs_from_spans(lm, [spans[padded]], [images[padded]]))[0]
        assert _generate(lm, batch)[padded] == alone, "the padded row generates otherwise than alone"
        assert (logits[:, -1] - base[:, -1]).abs().max() > 1e-3, f"{method} should change the model"
        with heads_off(lm.model):
            assert torch.equal(lm.model(**inputs_from_spans(lm, spans, images)).logits, base)
            if method == "prompt-tuning":
                with pytest.raises(ValueError, match="virtual tokens but the model's prompt is off"):
                    lm.model(**batch)
        torch.testing.assert_close(lm.model(**batch).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tunings_virtual_tokens_are_its_vectors_after_bos(family, model_dirs):
    """The input is [pads, BOS, n virtual tokens, span] and the model reads the prompt's n vectors, in order, at the
    virtual positions: the same logits as the model given those embeddings directly (inputs_embeds)."""
    from stages.models.prompt import attach_prompt, detach_prompt
    lm = load_model(model_dirs[family], dtype="float64")
    spans, images = _span_rows(lm)
    prompt = _randomised(METHODS["prompt-tuning"].add(lm, _student_config(method="prompt-tuning"))["prompt"])
    vectors, n = prompt.embedding.weight.detach(), prompt.embedding.num_embeddings
    inputs = inputs_from_spans(lm, spans, images)
    ids = inputs["input_ids"]
    virtual = torch.zeros_like(ids, dtype=torch.bool)
    for row, span in enumerate(spans):
        bos = ids.shape[1] - len(span) - n - 1
        assert ids[row, bos] == lm.tokenizer.bos_token_id and ids[row, -len(span):].tolist() == span
        assert inputs["attention_mask"][row, bos:].all() and not inputs["attention_mask"][row, :bos].any()
        virtual[row, bos + 1: bos + 1 + n] = True
        assert (ids[row, virtual[row]].diff() == 1).all() and ids[row, bos + 1] >= len(lm.tokenizer)
    detach_prompt(lm)
    with torch.no_grad():
        embeds = lm.model.get_input_embeddings()(ids.masked_fill(virtual, 0))
        embeds[virtual] = vectors.repeat(len(spans), 1)
        attach_prompt(lm, prompt)
        given = lm.model(**{k: v for k, v in inputs.items() if k != "input_ids"}, inputs_embeds=embeds).logits
        torch.testing.assert_close(lm.model(**inputs).logits, given, rtol=1e-9, atol=1e-9)


def test_prompt_tunings_losses_line_up_with_the_stored_span(model_dirs):
    """With the virtual tokens between BOS and the span, L_align compares stored span position j with the student's
    span position j and L_gt predicts the span's tokens (the first from the last virtual token): both equal to a
    hand computation on each row alone, [BOS, virtual ids, span], through every layer's MLP output."""
    from stages.batches import make_batch
    from stages.student import Student, losses
    from storage.writer import Item
    lm = load_model(model_dirs["idefics2"], dtype="float64")
    prompt = _randomised(METHODS["prompt-tuning"].add(lm, _student_config(method="prompt-tuning"))["prompt"])
    spans, images = _span_rows(lm)
    dims, g = lm.dims, torch.Generator().manual_seed(2)
    items = [Item(sample_id=str(i), view=0, token_ids=np.asarray(s, dtype=np.int32), icd_ids=(),
                  hidden=torch.randn(len(s), dims.n_layers, dims.d_model, generator=g, dtype=torch.float64),
                  keep=np.ones(len(s), dtype=bool)) for i, s in enumerate(spans)]
    layers = lm.adapter.decoder_layers(lm.model)
    with torch.no_grad():
        inputs, target, span_mask, ce_mask = make_batch(lm, items, images)
        student = Student(lm.model, prompt, layers, "ffn")
        logits, hidden = student(**inputs)
        l_align, l_gt = losses(logits, hidden, target, span_mask, ce_mask, inputs["input_ids"])
        student.remove_hooks()

        base, n = lm.model.get_input_embeddings().num_embeddings, prompt.embedding.num_embeddings
        outputs = {}
        hooks = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
                 for i, layer in enumerate(layers)]
        sq, ce, n_tokens = 0.0, 0.0, 0
        for it, span, image in zip(items, spans, images):
            ids = [lm.tokenizer.bos_token_id, *range(base, base + n), *span]
            row_logits = lm.model(**lm.adapter.model_inputs(lm.processor, [ids], [image])).logits[0]
            at = torch.arange(1 + n, len(ids))  # the span's positions
            mlp = torch.stack([outputs[i][0, at] for i in range(dims.n_layers)], dim=1)  # [span, layers, d]
            sq += (mlp - it.hidden).pow(2).sum().item()
            ce -= torch.log_softmax(row_logits[at - 1], -1)[torch.arange(len(span)), torch.tensor(span)].sum().item()
            n_tokens += len(span)
        for h in hooks:
            h.remove()
    # losses() takes the targets and the logits in float32, the hand float64
    assert l_align.item() == pytest.approx(sq / (n_tokens * dims.n_layers * dims.d_model), rel=1e-6)
    assert l_gt.item() == pytest.approx(ce / n_tokens, rel=1e-6)


# --- both methods: trained, saved, reloaded and evaluated, from one store -------------------------------------------

def _config(tmp, *overrides):
    return resolve(load_config(None, [f"run_dir={tmp}", "task.num_queries=16", "teacher.shots=4",
                                      "teacher.shard_size=8", "eval.num_samples=8", *overrides]))


@pytest.fixture(scope="module")
def store16(tmp_path_factory):
    """A 4-shot store of 16 queries of the embedded default (in this session's home)."""
    from stages import teacher
    tmp = tmp_path_factory.mktemp("compare")
    teacher.run(_config(tmp))
    return tmp


def _epoch_means(out, steps_per_epoch):
    rows = [json.loads(line) for line in open(os.path.join(out, "losses.jsonl"))]
    losses = [r["loss"] for r in rows]
    return rows, [sum(losses[i:i + steps_per_epoch]) / steps_per_epoch for i in range(0, len(losses), steps_per_epoch)]


@pytest.mark.parametrize("method", TEACHER_FREE)
def test_each_teacher_free_method_trains_saves_reloads_and_evaluates(store16, method):
    """3 epochs on L_gt alone (w_align 0 by default; L_align still logged): the last epoch's mean loss is at least
    5% below the first's (the same items each epoch); the artifact saved is what load_with_heads puts on a fresh
    model, `eval --mode trained` scores it on 8 queries, and heads_off gives the fresh base model's logits exactly."""
    from safetensors.torch import load_file

    from stages import evaluate, student
    from stages.api import heads_off, load_with_heads, prompt_inputs
    out = store16 / method
    cfg = _config(store16, f"student.method={method}", "student.epochs=3", f"student.out={out}")
    assert cfg.student.w_align == 0.0
    student.run(cfg)
    rows, means = _epoch_means(out, 4)
    assert len(rows) == 12 and all(r["l_align"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(0.5 * r["l_gt"], rel=1e-6) for r in rows), rows[0]
    assert means[-1] < 0.95 * means[0], means  # here about 0.59x (prompt) and 0.86x (virtual-kv)
    assert json.load(open(out / "method.json"))["method"] == method

    metrics = evaluate.run(_config(store16, "eval.mode=trained", f"eval.student={out}", f"eval.out={out}-eval"))
    assert metrics["method"] == method and metrics["n"] == 8

    model, processor = load_with_heads(cfg.model.path, str(out))
    if method == "prompt-tuning":  # peft's layout
        vectors = load_file(out / "prompt" / "adapter_model.safetensors")["prompt_embeddings"]
        saved = {"prompt.embedding.weight": vectors}
    else:
        saved = {f"virtual_kv.{k}": v for k, v in load_file(out / "virtual_kv" / "virtual_kv.safetensors").items()}
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in saved.items()), sorted(saved)
    fresh = load_model(cfg.model.path).model
    with torch.no_grad(), heads_off(model):
        inputs = prompt_inputs(model, processor, [random_image(0, 16)], ["What is it?"])
        torch.testing.assert_close(model(**inputs).logits, fresh(**inputs).logits, rtol=0, atol=0)


# --- student.num_queries: the store's first N queries ------------------------------------------------------------

def test_training_queries_of_n_are_the_first_n_of_a_larger_set(data_root):
    """The property student.num_queries rests on: the seeded shuffle's first N queries are those of N alone, for a
    task with a training split and for one split out of a single labelled set (MME, by image)."""
    from stages.tasks import get_task
    from stages.tasks.pools import training_queries
    for name, root, n, m in (("vqav2", data_root, 5, 20), ("mme", os.path.join(data_root, "mme"), 5, 12)):
        ids = lambda k: [q.id for q in training_queries(get_task(name), root, "train", k, seed=3407)]  # noqa: E731
        assert ids(n) == ids(m)[:n], name


@pytest.mark.parametrize("n", [1, 7, 11, 12, 23])
def test_the_reader_reads_the_items_of_the_first_n_queries_only(store, n):  # noqa: F811
    """queries=N: each epoch yields one item of each of the store's first N queries but the skipped ones (read from
    the manifest's query list here), with view epoch mod V and the stored data; resume and the data-parallel split
    are those of a store of just them."""
    url, m, written = store
    skipped = {q for per_shard in SKIPPED.values() for q in per_shard}
    first = [q for q in m.query_ids[:n] if q not in skipped]
    reader = TargetReader(url, seed=3, shuffle_buffer=4, queries=n)
    assert len(reader) == len(first)
    for epoch in range(3):
        items = list(reader.epoch(epoch))
        assert sorted(it.sample_id for it in items) == sorted(first) and {it.view for it in items} == {epoch % 3}
        for it in items:
            assert_same_item(it, written[it.sample_id, it.view])
    whole = keys(TargetReader(url, seed=3, shuffle_buffer=4, queries=n).epoch(1))
    assert keys(TargetReader(url, seed=3, shuffle_buffer=4, queries=n).epoch(1, start=len(first) // 2)) == \
        whole[len(first) // 2:]
    ranks = [keys(TargetReader(url, seed=3, shuffle_buffer=4, queries=n, rank=r, world_size=2, batch=2).epoch(1))
             for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == whole[: len(first) - len(first) % 2]


@pytest.mark.parametrize("n", [0, 24])
def test_the_reader_refuses_a_prefix_the_store_does_not_have(store, n):  # noqa: F811
    with pytest.raises(ValueError, match=r"need 1 <= queries <= 23"):
        TargetReader(store[0], seed=0, queries=n)


def test_student_trains_on_the_first_n_queries_and_refuses_more_than_the_store(store16, monkeypatch):
    """student.num_queries=8 on the 16-query store: every epoch the student reads the items of exactly the first 8
    training queries (those of task.num_queries=8), and its method.json reports 8; 17 is refused in one line before
    any model loads."""
    from stages import student
    from stages.tasks import get_task
    from stages.tasks.pools import training_queries
    seen: dict[int, list[str]] = {}
    real = TargetReader.epoch

    def recording(self, epoch, start=0):
        for it in real(self, epoch, start):
            seen.setdefault(epoch, []).append(it.sample_id)
            yield it
    monkeypatch.setattr(TargetReader, "epoch", recording)
    out = store16 / "first8"
    cfg = _config(store16, "student.num_queries=8", "student.epochs=2", f"student.out={out}")
    student.run(cfg)
    expected = [q.id for q in training_queries(get_task("vqav2"), cfg.task.root, "train", 8, seed=cfg.task.seed)]
    assert sorted(seen) == [0, 1] and all(sorted(ids) == sorted(expected) for ids in seen.values()), seen
    assert json.load(open(out / "method.json"))["train_queries"] == 8
    assert resolve(load_config(None, ["student.num_queries=8"])).student.out.endswith("-mimic-n8")

    monkeypatch.setattr("stages.student.load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(UserError) as e:
        student.run(_config(store16, "student.num_queries=17", f"student.out={store16}/first17"))
    assert "\n" not in str(e.value) and "student.num_queries = 17" in str(e.value) and "16 queries" in str(e.value)


# --- config: the teacher-free methods' defaults --------------------------------------------------------------------

@pytest.mark.parametrize("method, unset", [("mimic", 1.0), ("lora", 1.0), ("prompt-tuning", 0.0), ("virtual-kv", 0.0)])
def test_the_teacher_free_methods_take_w_align_0_unless_it_is_set(method, unset):
    assert _student_config(method=method).w_align == unset
    assert _student_config(method=method, w_align=1.0).w_align == 1.0
    assert _student_config(method=method, w_align=0.25).w_align == 0.25
