"""The teacher's peak memory per rank, in bytes of live tensors on the model's device (README.md, Teacher memory).

Notation: s bytes per value of the model's dtype; b prompts per forward; k shots; N = b(k + 1) images of q x q
pixels and P patches each; t tokens per demonstration (text and image, with BOS and instruction spread over them)
and S in the span (query + answer), so T = kt + S per prompt and n = bT per batch; L decoder layers of width d, MLP
width I, H heads (Hkv key/value heads) of width h; V the vocabulary, K the logits kept per prompt (S with
teacher.logits, else 1). Vision encoder: width dv, MLP width Iv, hv heads. Connector: Ic the MLP width it runs on
every patch (Idefics2: I; 0 none). Resampler: Rd its context width (0 none), Rr its key + value width with the heads
repeated, Q latents. sv bytes per stored value.

  weights     = (parameters + buffers) s
  activations = 24n + 20Nq²                 (input ids, mask, positions int64; pixels float32, pixel mask int64)
              + max over the phases of the forward of what each holds besides the inputs, where
                E = Nq²(3s + 8) + N(P + 9) + nsd holds the model's copies of the images, their pixel and patch masks,
                and the token embeddings (made before the images are encoded):
      pixels    Nq²(6s + 8) + nsd                      the images made the model's dtype, then the real ones kept
      vision    E + NP²m + max(NPs·8dv + Av, NPs(4dv + 2Iv) + Wv)     a vision layer's attention, or its MLP
      connector E + NPs(dv + 3Ic)                                     gate, up and their product, per patch
      resampler E + NPs·dv + N(P + Q)(Rd·s + max(8Rd + 8, (2Rd + Rr)s)) + 6NQ·Rd·s     context normed (float32),
                                                                      or joined to the Q latents, with its k, v
      decoder   NPs·dv + ns(2d + 2h) + bT²m' + max(ns(2d + 5Hh + 2Hkv·h) + At, ns(3d + 3I) + Wt)   attention, MLP
      logits    NPs·dv + 3nsd + bKVs
      stack     bSLds + c·bRLd·sv + bKVs + 8SV·[K > 1]    after the forward: torch.stack's [b, S, L, d], the batch's
                items where they are copies (c = 1: a store dtype other than the model's, or teacher.span text; else
                views of the stack), the logits kept and one prompt's answer logits in float32
  capture     = bSLds         the hooks' clones of the last S positions of each layer (kept until the next forward)
  shards      = (2·shard_size·views - b)·R·L·d·sv   the shard written in the background and the one being filled,
                less the batch in the forward (b at most shard_size·views); R rows per item (S, or the span's text tokens with teacher.span text).
                The items stay on the device until the writer copies them out (sv = 4 for an int8 store).
  total       = weights + activations + capture + shards

Attention: sdpa (or flash) materialises no score matrix, only padding masks: booleans (m = 1; the decoder's when
b > 1: m' = [b > 1]) made float inside the call (Av = NP²s, At = bT²s·[b > 1]; Wv = Wt = 0). Eager attention has
masks in the model's dtype (m = m' = s), e bytes per score in the call (the scores, their float32 copy and softmax:
e = s + 8, or s + 4 in float32): Av = NP²hv·e, At = bT²H·e, and a layer keeps its attention weights through its MLP
(`hidden_states, _ = self_attn(...)`): Wv = NP²hv·s, Wt = bT²H·s.
Each phase counts every tensor alive at any moment of it, so the sum is an upper bound (for Idefics, whose gated
cross-attention is not modelled apart, a looser one); the CUDA caching allocator reserves more (fragmentation);
the writer's numpy copies are host memory. Checked against measured peaks by tests/test_teacher_memory.py.
"""
from __future__ import annotations

from dataclasses import dataclass

TEXT_TOKENS = 16  # text tokens of a VQAv2 demonstration ("Image: Question: ... Answer: ...\n"), or of a span


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of a model (from_config reads it from a config, loading no weights)."""
    params: int; dtype_bytes: int; layers: int; width: int; mlp: int; heads: int; kv_heads: int; head_dim: int
    vocab: int; image_tokens: int; image_px: int; patches: int; vision_width: int; vision_mlp: int
    vision_heads: int; connector_mlp: int = 0; resampler_width: int = 0; resampler_kv: int = 0; latents: int = 0


def teacher_peak(m: Shapes, *, batch: int, shots: int, demo_tokens: int, span: int, shard_items: int,
                 values_bytes: int, logits_kept: int = 1, stored_rows: int | None = None, copied: bool = True,
                 attention: str = "sdpa") -> dict:
    """Bytes per rank, by term (the module's formula), and the phase of the forward that peaks.
    shard_items: shard_size x views; stored_rows: rows stored per item (R; default the span); copied: c."""
    s, sv, b, S, d, h, L = m.dtype_bytes, values_bytes, batch, span, m.width, m.head_dim, m.layers
    R, Q, Rd = stored_rows or S, m.latents, m.resampler_width
    N, q2, P, dv = b * (shots + 1), m.image_px ** 2, m.patches, m.vision_width
    T = shots * demo_tokens + span
    n, NP = b * T, N * m.patches
    E = N * q2 * (3 * s + 8) + N * (P + 9) + n * s * d
    if attention == "eager":
        e = s + 4 + 4 * (s < 4)
        mask, mask_text = s, s
        scores_v, scores_t = N * P * P * m.vision_heads * e, b * T * T * m.heads * e
        kept_v, kept_t = N * P * P * m.vision_heads * s, b * T * T * m.heads * s
    else:
        mask, mask_text, kept_v, kept_t = 1, int(b > 1), 0, 0
        scores_v, scores_t = N * P * P * s, b * T * T * s * (b > 1)
    phases = {
        "pixels": N * q2 * (6 * s + 8) + n * s * d,
        "vision": E + N * P * P * mask + max(NP * s * 8 * dv + scores_v, NP * s * (4 * dv + 2 * m.vision_mlp) + kept_v),
        "connector": E + NP * s * (dv + 3 * m.connector_mlp),
        "resampler": E + NP * s * dv + 6 * N * Q * Rd * s
        + N * (P + Q) * (Rd * s + max(8 * Rd + 8, (2 * Rd + m.resampler_kv) * s)),
        "decoder": NP * s * dv + n * s * (2 * d + 2 * h) + b * T * T * mask_text
        + max(n * s * (2 * d + 5 * m.heads * h + 2 * m.kv_heads * h) + scores_t, n * s * (3 * d + 3 * m.mlp) + kept_t),
        "logits": NP * s * dv + 3 * n * s * d + b * logits_kept * m.vocab * s,
        "stack": b * L * d * (S * s + copied * R * sv) + b * logits_kept * m.vocab * s
        + 8 * S * m.vocab * (logits_kept > 1),
    }
    terms = {"weights": m.params * s,
             "activations": 24 * n + 20 * N * q2 + max(phases.values()),
             "capture": b * S * L * d * s,
             "shards": (2 * shard_items - min(b, shard_items)) * R * L * d * sv}
    return terms | {"total": sum(terms.values()), "peak_phase": max(phases, key=phases.get)}


def from_config(config, dtype: str) -> Shapes:
    """The Shapes of a transformers config of a supported family; the parameters are counted on the meta device."""
    import torch

    from stages.models import DTYPES, FAMILIES
    with torch.device("meta"):
        model = FAMILIES[config.model_type].MODEL_CLASS._from_config(config, dtype=DTYPES[dtype])
    params = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    c, v, p = config.get_text_config(), config.vision_config, getattr(config, "perceiver_config", None)
    heads, patches = c.num_attention_heads, (v.image_size // v.patch_size) ** 2
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    dv = getattr(v, "hidden_size", None) or v.embed_dim
    common = dict(params=params, dtype_bytes=DTYPES[dtype].itemsize, layers=c.num_hidden_layers, width=c.hidden_size,
                  mlp=c.intermediate_size, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                  head_dim=head_dim, vocab=c.vocab_size + getattr(c, "additional_vocab_size", 0), image_px=v.image_size,
                  patches=patches, vision_width=dv, vision_mlp=v.intermediate_size, vision_heads=v.num_attention_heads)
    if config.model_type == "idefics2":  # fake, latents, fake; the connector's MLP runs on every patch
        heads_p, kv_p = p.resampler_n_heads, p.num_key_value_heads  # sdpa repeats k, v when it is given a mask
        kv = p.resampler_head_dim * (kv_p + heads_p * (heads_p != kv_p))
        return Shapes(**common, image_tokens=p.resampler_n_latents + 2, connector_mlp=c.intermediate_size,
                      resampler_width=p.hidden_size, resampler_kv=2 * kv, latents=p.resampler_n_latents)
    if config.model_type == "idefics3":  # fake, global tag, pixel-shuffled patches, fake
        return Shapes(**common, image_tokens=patches // config.scale_factor ** 2 + 3)
    # idefics: an <image> marker between fakes; the perceiver reads the vision encoder's output
    return Shapes(**common, image_tokens=3, resampler_width=dv,
                  resampler_kv=2 * p.resampler_n_heads * p.resampler_head_dim, latents=p.resampler_n_latents)
