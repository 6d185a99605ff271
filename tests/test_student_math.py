"""The student's arithmetic (METHOD.md §4), pinned in-process against values worked out by hand.

`losses` on a batch small enough to add up on paper, `make_batch`'s placement of targets and masks,
and what `Student` captures per layer, against the decoder layers' residual stream.
"""
import math

import numpy as np
import pytest
import torch

from stages.models import load_model
from stages.models.encode import encode
from stages.models.heads import attach, build_heads, detach
from stages.batches import make_batch
from stages.student import Student, losses
from stages.tasks.prompts import build_prompt
from stages.tasks.sample import Sample
from storage.writer import Item
from tests.conftest import FAMILIES, random_image


def _hand_batch():
    """b=2, t=3, l=2 layers, d=2, vocab 3.

    row 0: [BOS, x1, x2], unpadded; x2 has no stored row (text-only span: an image token).
    row 1: [PAD, BOS, y1], left-padded.
    So span_mask = [[0,1,0],[0,0,1]] and, as make_batch builds it, ce_mask = span tokens = [[0,1,1],[0,0,1]].
    """
    target = torch.zeros(2, 3, 2, 2)
    hidden = torch.full((2, 3, 2, 2), 3.0)  # 3 everywhere off the kept span: BOS, padding, the image token
    # Kept positions. Targets differ between layers, so pairing layer l with layer l-1 changes the sum.
    target[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    hidden[0, 1] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])    # squared errors 1 + 0 + 0 + 4 = 5
    target[1, 2] = torch.tensor([[2.0, 2.0], [1.0, -1.0]])
    hidden[1, 2] = torch.tensor([[2.0, 3.0], [1.0, 1.0]])    # squared errors 0 + 1 + 0 + 4 = 5
    span_mask = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ce_mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    input_ids = torch.tensor([[1, 0, 2], [0, 1, 2]])
    # Next-token distributions, logits = log p, so each CE term is -log p[next id], a power of two.
    probs = torch.tensor([
        [[1 / 2, 1 / 4, 1 / 4],   # row 0 pos 0 -> id 0 (x1): log 2
         [1 / 2, 3 / 8, 1 / 8],   # row 0 pos 1 -> id 2 (x2): log 8
         [1 / 3, 1 / 3, 1 / 3]],  # last position predicts nothing
        [[1 / 2, 1 / 4, 1 / 4],   # row 1 pad -> id 1 (BOS): log 4, masked out
         [1 / 4, 1 / 2, 1 / 4],   # row 1 BOS -> id 2 (y1): log 4
         [1 / 3, 1 / 3, 1 / 3]],
    ], dtype=torch.float64)
    return probs.log(), hidden, target, span_mask, ce_mask, input_ids


def test_losses_match_hand_computed_values():
    logits, hidden, target, span_mask, ce_mask, input_ids = _hand_batch()
    l_align, l_gt = losses(logits, hidden, target, span_mask, ce_mask, input_ids)
    # L_align: (5 + 5) squared error over 2 kept tokens x 2 layers x 2 dims = 10 / 8. A plain mean over all
    # 6 positions would be (10 + 4 x 36) / 24; layer l against layer l-1 gives 25 / 4 or 28 / 8.
    assert l_align.item() == pytest.approx(10 / 8, abs=1e-12)
    # L_gt: (log 2 + log 8 + log 4) / 3 = 2 log 2. Without the shift it would be (log 2 + 2 log 3) / 3;
    # with ce_mask[:, :-1] log 8; with the attention mask (pad -> BOS counted) 10/4 log 2.
    assert l_gt.item() == pytest.approx(2 * math.log(2), rel=1e-6)  # losses() computes the CE in float32


def test_losses_ignore_whatever_sits_off_the_span():
    """Hidden states at BOS, padding and un-kept positions, and logits that predict no span token, count for nothing."""
    logits, hidden, target, span_mask, ce_mask, input_ids = _hand_batch()
    before = losses(logits, hidden, target, span_mask, ce_mask, input_ids)
    off_span = span_mask == 0
    hidden[off_span] = -50.0
    logits[1, 0] = torch.tensor([9.0, -9.0, 0.0])  # the pad position, which would predict BOS
    logits[:, -1] = torch.tensor([0.0, 7.0, -7.0])  # the last position predicts nothing
    after = losses(logits, hidden, target, span_mask, ce_mask, input_ids)
    assert after[0].item() == before[0].item() and after[1].item() == before[1].item()


def test_make_batch_places_targets_and_masks_by_hand(model_dirs):
    """A 3-token span whose middle token has no stored row, and a 5-token span: left padding, BOS, keep."""
    lm = load_model(model_dirs["idefics2"])
    bos, d, n_layers = lm.tokenizer.bos_token_id, lm.dims.d_model, lm.dims.n_layers
    short_hidden = torch.arange(2 * n_layers * d, dtype=torch.float32).reshape(2, n_layers, d) + 1
    long_hidden = -torch.arange(5 * n_layers * d, dtype=torch.float32).reshape(5, n_layers, d) - 1
    items = [Item("a", 0, np.array([10, 11, 12], dtype=np.int32), short_hidden, (), np.array([True, False, True])),
             Item("b", 0, np.array([20, 21, 22, 23, 24], dtype=np.int32), long_hidden, (), np.ones(5, dtype=bool))]
    inputs, target, span_mask, ce_mask = make_batch(lm, items, [[], []])
    pad = lm.tokenizer.pad_token_id
    # t = 1 + 5: row 0 is [PAD, PAD, BOS, 10, 11, 12], row 1 is [BOS, 20, ..., 24].
    assert inputs["input_ids"].tolist() == [[pad, pad, bos, 10, 11, 12], [bos, 20, 21, 22, 23, 24]]
    assert span_mask.tolist() == [[0, 0, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1]]
    assert ce_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    expected = torch.zeros(2, 6, n_layers, d)
    expected[0, 3], expected[0, 5] = short_hidden[0], short_hidden[1]  # stored rows go to the kept tokens in order
    expected[1, 1:] = long_hidden
    assert torch.equal(target, expected)
    # With answer starts (the answer begins at span index 2 in both rows), L_gt starts there.
    _, _, _, ce_answer = make_batch(lm, items, [[], []], {"a": 2, "b": 2})
    assert ce_answer.tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1]]



def _bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that NaNs and -0 compare exactly."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_target_gives_the_losses_of_its_float32_values_bit_for_bit(model_dirs, dtype):
    """make_batch keeps a 16-bit store's targets in its dtype; the loop casts them to the model's dtype and losses()
    to float32, which must give exactly what the float32 target built before (zeros, stored rows as float32) gave."""
    lm = load_model(model_dirs["idefics2"])
    n_layers, d = lm.dims.n_layers, lm.dims.d_model
    g = torch.Generator().manual_seed(0)
    short_hidden = (torch.randn(2, n_layers, d, generator=g) * 3).to(dtype)
    long_hidden = (torch.randn(5, n_layers, d, generator=g) * 3).to(dtype)
    long_hidden[0, 0, :3] = torch.tensor([torch.finfo(dtype).tiny / 4, -0.0, 0.1])  # a subnormal, -0, a rounded value
    items = [Item("a", 0, np.array([10, 11, 12], dtype=np.int32), short_hidden, (), np.array([True, False, True])),
             Item("b", 0, np.array([20, 21, 22, 23, 24], dtype=np.int32), long_hidden, (), np.ones(5, dtype=bool))]
    inputs, target, span_mask, ce_mask = make_batch(lm, items, [[], []])
    assert target.dtype == dtype  # half the bytes of float32 to build and to move to the accelerator
    expected = torch.zeros(2, 6, n_layers, d)  # placed by hand, as in the test above
    expected[0, 3], expected[0, 5] = short_hidden[0].float(), short_hidden[1].float()
    expected[1, 1:] = long_hidden.float()
    assert torch.equal(_bits(target.float()), _bits(expected))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    logits = torch.randn(2, 6, vocab, generator=g)
    for model_dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden = torch.randn(2, 6, n_layers, d, generator=g).to(model_dtype)
        # As stages/student.py's loop calls it: the target cast to the model's dtype.
        got = losses(logits, hidden, target.to(model_dtype), span_mask, ce_mask, inputs["input_ids"])
        want = losses(logits, hidden, expected.to(model_dtype), span_mask, ce_mask, inputs["input_ids"])
        assert got[0].dtype == torch.float32 and torch.equal(_bits(got[0]), _bits(want[0])), model_dtype
        assert torch.equal(_bits(got[1]), _bits(want[1])), model_dtype


def test_the_loops_cast_of_a_16_bit_target_equals_the_cast_of_its_float32_values():
    """Every bfloat16 and float16 bit pattern: cast to each model dtype directly (the loop's cast of a 16-bit target)
    gives the bits of the cast through float32 (the target as it was built before), infinities, -0 and subnormals
    included. A NaN stays a NaN (its payload may differ: a NaN target makes the loss NaN either way)."""
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for stored in (torch.bfloat16, torch.float16):
        values = patterns.view(stored)
        nan = torch.isnan(values)
        assert 0 < nan.sum() < len(values)
        for model_dtype in (torch.float32, torch.bfloat16, torch.float16):
            direct, through = values.to(model_dtype), values.float().to(model_dtype)
            assert torch.equal(_bits(direct)[~nan], _bits(through)[~nan]), (stored, model_dtype)
            assert torch.isnan(direct)[nan].all() and torch.isnan(through)[nan].all(), (stored, model_dtype)


def _residual_reference(lm, inputs):
    """Per decoder layer, from its residual stream alone (no hook on the attention or MLP modules):
    attention output = post-attention norm input − layer input,
    MLP output = layer output − post-attention norm input."""
    seen = {}

    def save(key):
        return lambda m, args, kwargs, *out: seen.__setitem__(
            key, (out[0] if out else (args[0] if args else kwargs["hidden_states"])))

    hooks = []
    for i, layer in enumerate(lm.adapter.decoder_layers(lm.model)):
        hooks.append(layer.register_forward_pre_hook(save(("in", i)), with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(save(("mid", i)), with_kwargs=True))
        hooks.append(layer.register_forward_hook(save(("out", i)), with_kwargs=True))
    try:
        logits = lm.model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    first = lambda x: x[0] if isinstance(x, tuple) else x
    n = lm.dims.n_layers
    attn = [seen[("mid", i)] - seen[("in", i)] for i in range(n)]
    mlp = [first(seen[("out", i)]) - seen[("mid", i)] for i in range(n)]
    return logits, {"attn": attn, "ffn": mlp}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("capture", ["ffn", "attn"])
def test_student_captures_each_layers_output_in_layer_order(family, capture, model_dirs):
    lm = load_model(model_dirs[family], dtype="float64")
    samples = [Sample(str(i), b"", f"what color is shape {i}?", ("red",) * 10) for i in range(2)]
    load = lambda s: random_image(int(s.id))
    prompts = [build_prompt("vqa", "mimic", s, [], answer="red", load=load) for s in samples]
    inputs = encode(lm, prompts).inputs
    heads = build_heads(lm.dims.n_layers, lm.dims.n_heads, lm.dims.head_dim).double()
    with torch.no_grad():
        heads.shift_lhd.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))  # heads that matter
    attach(lm, heads)
    student = Student(lm.model, heads, lm.adapter.decoder_layers(lm.model), capture)
    try:
        logits, hidden = student(**inputs)
        student.remove_hooks()
        ref_logits, ref = _residual_reference(lm, inputs)
    finally:
        detach(lm)
    b, t = inputs["input_ids"].shape
    assert hidden.shape == (b, t, lm.dims.n_layers, lm.dims.d_model)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for i, expected in enumerate(ref[capture]):
        torch.testing.assert_close(hidden[:, :, i], expected, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, i=i: f"layer {i}: {m}")
    # Layers must differ from one another, or a shifted layer order would pass.
    assert all((ref[capture][i] - ref[capture][i + 1]).abs().max() > 1e-3 for i in range(lm.dims.n_layers - 1))
