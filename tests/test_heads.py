"""Exactness of the MimIC head (METHOD.md §2): with oracle stand-ins it reproduces attention over the context."""
import pytest
import torch

from stages.models import load_model
from stages.models.encode import encode, tokenize
from stages.models.heads import attach, build_heads, detach, mimic_attention
from stages.tasks.prompts import build_prompt
from stages.tasks.sample import Sample
from tests.conftest import FAMILIES, random_image


def _expand(kv, n_heads):
    return kv.repeat_interleave(n_heads // kv.shape[1], dim=1)


class Oracle:
    """v := SA(q,K_D,V_D) − SA(q,K,V) and f(q) := log Σ_{k∈K_D} exp(s·q·k), from real context keys/values."""

    masked_log_z2 = True

    def __init__(self, context, scaling):
        self.context, self.scaling = context, scaling  # layer -> (K_D [b,hkv,c,d], V_D, valid [b,c] bool)

    def layer_terms(self, layer, query, attn):
        k, v, valid = self.context[layer]
        k, v = _expand(k, query.shape[1]), _expand(v, query.shape[1])
        scores = torch.einsum("bhtd,bhcd->bhtc", query, k) * self.scaling
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        sa_context = torch.softmax(scores, -1) @ v
        return torch.logsumexp(scores, -1), sa_context - attn


@pytest.mark.parametrize("family", FAMILIES)
def test_module_level_oracle_equals_attention_over_context(family, model_dirs):
    lm = load_model(model_dirs[family], dtype="float64")
    module = lm.adapter.decoder_layers(lm.model)[0].self_attn
    dims = lm.dims
    g = torch.Generator().manual_seed(0)
    b, c, t = 2, 5, 4
    q = torch.randn(b, dims.n_heads, t, dims.head_dim, generator=g, dtype=torch.float64)
    k_all = torch.randn(b, dims.n_kv_heads, c + t, dims.head_dim, generator=g, dtype=torch.float64)
    v_all = torch.randn(b, dims.n_kv_heads, c + t, dims.head_dim, generator=g, dtype=torch.float64)
    # Row 1 is padded: its first two context keys and its first query key are padding.
    valid = torch.ones(b, c + t, dtype=torch.bool)
    valid[1, :2] = False
    valid[1, c] = False
    causal = torch.ones(t, c + t, dtype=torch.bool).tril(c)
    full_mask = causal[None, None] & valid[:, None, None, :]
    s = module.scaling
    reference, _ = mimic_attention(module, q, k_all, v_all, full_mask, scaling=s)  # no heads attached: plain SDPA

    oracle = Oracle({0: (k_all[:, :, :c], v_all[:, :, :c], valid[:, :c])}, s)
    from stages.models import heads as heads_module
    heads_module._ATTACHED[module] = (oracle, 0)
    try:
        query_mask = full_mask[..., c:]
        shifted, _ = mimic_attention(module, q, k_all[:, :, c:], v_all[:, :, c:], query_mask, scaling=s)
    finally:
        heads_module._ATTACHED.pop(module)
    rows = [(0, slice(0, t)), (1, slice(1, t))]  # padding query positions are not compared
    for row, keep in rows:
        torch.testing.assert_close(shifted[row, keep], reference[row, keep], rtol=1e-10, atol=1e-10)


def _prompts(kind_items):
    samples = [Sample(str(i), b"", f"what color is shape {i}?", ("red",) * 10) for i in range(6)]
    images = {s.id: random_image(int(s.id)) for s in samples}
    load = lambda s: images[s.id]
    return [build_prompt("vqa", "icl", samples[q], [(samples[i], "blue") for i in icds], answer="red", load=load)
            for q, icds in kind_items]


def _layer_outputs(lm, inputs):
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))]
    try:
        out = lm.model(**inputs, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return captured, out


@pytest.mark.parametrize("family", FAMILIES)
def test_model_level_oracle_heads_reproduce_icl_layer_outputs(family, model_dirs):
    lm = load_model(model_dirs[family], dtype="float64")
    # Batch of 2 with different context lengths (1 and 3 ICDs), so both runs are padded.
    prompts = _prompts([(0, [1]), (2, [3, 4, 5])])
    icl = encode(lm, prompts)
    if family == "idefics":
        # Idefics' image mask lets the query's "Image:" tokens, which come before the query image,
        # cross-attend to the last demonstration's image: a context effect through gated
        # cross-attention, which heads on self-attention do not model. Cut it so that the identity
        # under test is the self-attention one.
        image_id = lm.tokenizer.convert_tokens_to_ids("<image>")
        for b, n in enumerate(icl.span_lens):
            span = icl.inputs["input_ids"][b, -n:].tolist()
            t = icl.inputs["input_ids"].shape[1]
            icl.inputs["image_attention_mask"][b, t - n : t - n + span.index(image_id)] = 0
    icl_layers, _ = _layer_outputs(lm, icl.inputs)

    context_prompts = [type(p)((), p.context) for p in prompts]  # C alone: BOS + instruction + ICDs
    ctx = encode(lm, context_prompts)
    _, ctx_out = _layer_outputs(lm, ctx.inputs)
    ctx_valid = ctx.inputs["attention_mask"].bool()
    cache = ctx_out.past_key_values
    context = {i: (cache.layers[i].keys, cache.layers[i].values, ctx_valid) for i in range(lm.dims.n_layers)}

    # Q alone: no BOS of its own, position ids continue after |C| (so RoPE sees the same offsets).
    rows = [tokenize(lm, p)[0][tokenize(lm, p)[1]:] for p in prompts]
    images = [[x for x in p.query if not isinstance(x, str)] for p in prompts]
    inputs = lm.adapter.model_inputs(lm.processor, rows, images)
    inputs["position_ids"] = inputs["position_ids"] + ctx_valid.sum(-1, keepdim=True)
    # Attention over [C; Q] for the Q run: the keys of C enter only through the oracle.
    scaling = lm.adapter.decoder_layers(lm.model)[0].self_attn.scaling
    attach(lm, Oracle(context, scaling))
    try:
        q_layers, _ = _layer_outputs(lm, inputs)
    finally:
        detach(lm)
    for i in range(lm.dims.n_layers):
        for b, n in enumerate(icl.span_lens):
            torch.testing.assert_close(q_layers[i][b, -n:], icl_layers[i][b, -n:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_heads_change_outputs_only_slightly_and_zero_shift_is_identity(family, model_dirs):
    lm = load_model(model_dirs[family], dtype="float64")
    enc = encode(lm, _prompts([(0, [1]), (2, [])]))
    base = lm.model(**enc.inputs).logits
    heads = build_heads(lm.dims.n_layers, lm.dims.n_heads, lm.dims.head_dim).double()
    attach(lm, heads)
    try:
        shifted = lm.model(**enc.inputs).logits
        with torch.no_grad():
            heads.shift_lhd.zero_()
        zero = lm.model(**enc.inputs).logits
    finally:
        detach(lm)
    assert not torch.equal(shifted, base)
    torch.testing.assert_close(zero, base, rtol=0, atol=0)
