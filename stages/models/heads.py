"""MimIC attention heads (METHOD.md §2), on every decoder self-attention of any family.

Softmax attention over [ICDs; query] splits exactly (METHOD.md §1, seed Eq. 6):

    SA(q, [K_D;K], [V_D;V]) = SA(q,K,V) + μ·(SA(q,K_D,V_D) − SA(q,K,V)),   μ = Z1 / (Z1 + Z2)

A MimIC head keeps SA(q,K,V) and learns the rest: a shift vector v stands for the difference term
and a linear f(q) for log Z1, so μ̃ = σ(f(q) − log Z2) = exp(f) / (exp(f) + Z2).

The heads live outside the model. One attention function, registered with transformers' attention
registry, runs the usual SDPA and adds μ̃·v for the modules that carry heads; every other module
(vision encoder, perceiver, Idefics' gated cross-attention) passes through untouched.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "mimic"


SHIFTS = ("mimic", "linear", "vector")  # seed Tab. 8: MimIC's shift, or (1−μ)·SA + μ·h with h a linear layer / a vector
GATES = ("query", "shared", "constant")  # μ per head and query (MimIC), one per layer, or independent of the query


class MimicHeads(nn.Module):
    """Per layer l and head h: shift v[l,h] ∈ R^d_h and f(q) = w[l,h]·q + b[l,h] (METHOD.md §2), or an ablation
    (METHOD.md §5, seed Tab. 8):

    shift: mimic   SA + μ̃·v
           vector  (1−μ̃)·SA + μ̃·h, h = v a learnable vector
           linear  (1−μ̃)·SA + μ̃·h(q), h(q) = W[l,h]·q + v[l,h] a linear layer R^d_h → R^d_h
    mu:    query     μ̃ = σ(f(q) − log Z2) per head
           shared    one gate per layer: f(q) = w[l]·[q_1; …; q_H] + b[l] over all heads' queries, log Z2
                     averaged over the heads (the authors' head-shared code, AttnApproximator without MULTI_HEAD)
           constant  μ̃ = σ(b[l,h]), one learnable scalar per head, independent of the query
    """

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, masked_log_z2: bool = True,
                 shift: str = "mimic", mu: str = "query"):
        super().__init__()
        assert shift in SHIFTS and mu in GATES, (shift, mu)
        # Created in this order so that the default heads draw the same numbers as they always did.
        self.shift_lhd = nn.Parameter(torch.randn(n_layers, n_heads, head_dim) * 1e-3)
        if mu == "query":
            self.weight_lhd = nn.Parameter(torch.randn(n_layers, n_heads, head_dim) * 0.02)
            self.bias_lh = nn.Parameter(torch.zeros(n_layers, n_heads))
        elif mu == "shared":
            self.weight_ld = nn.Parameter(torch.randn(n_layers, n_heads * head_dim) * 0.02)
            self.bias_l = nn.Parameter(torch.zeros(n_layers))
        else:
            self.bias_lh = nn.Parameter(torch.zeros(n_layers, n_heads))
        if shift == "linear":
            self.proj_lhde = nn.Parameter(torch.randn(n_layers, n_heads, head_dim, head_dim) * 0.02)
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim
        # Masked (the derivation) by default; unmasked reproduces the authors' code (METHOD.md §2).
        self.masked_log_z2 = masked_log_z2
        self.shift, self.mu = shift, mu

    def config(self) -> dict:
        """What build_heads needs to make heads of this shape and kind."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "head_dim": self.head_dim,
                "masked_log_z2": self.masked_log_z2, "shift": self.shift, "mu": self.mu}

    def log_z1(self, layer: int, query_bhtd: torch.Tensor) -> torch.Tensor:
        """The stand-in for log Z1: [b,h,t] per head, [b,1,t] for a shared gate, [1,h,1] for a constant one."""
        if self.mu == "constant":
            return self.bias_lh[layer][None, :, None]
        if self.mu == "shared":
            b, h, t, d = query_bhtd.shape
            query_btx = query_bhtd.transpose(1, 2).reshape(b, t, h * d)  # [b,t,h*d]: the heads' queries side by side
            return (query_btx @ self.weight_ld[layer].to(query_bhtd.dtype) + self.bias_l[layer])[:, None, :]
        w_hd, b_h = self.weight_lhd[layer], self.bias_lh[layer]
        return torch.einsum("bhtd,hd->bht", query_bhtd, w_hd.to(query_bhtd.dtype)) + b_h[None, :, None]

    def h(self, layer: int, query_bhtd: torch.Tensor) -> torch.Tensor:
        """The stand-in for SA(q, K_D, V_D) of the interpolated forms: v, or W·q + v."""
        v_hd = self.shift_lhd[layer]
        if self.shift == "vector":
            return v_hd[None, :, None, :]
        return torch.einsum("bhtd,hed->bhte", query_bhtd, self.proj_lhde[layer].to(query_bhtd.dtype)) + v_hd[None, :, None, :]

    def layer_terms(self, layer: int, query_bhtd: torch.Tensor, attn_bhtd: torch.Tensor):
        """(log Z1 stand-in, shift broadcastable to [b,h,t,d]) for one layer; the output is SA + μ̃·shift."""
        if self.shift == "mimic":
            return self.log_z1(layer, query_bhtd), self.shift_lhd[layer][None, :, None, :]
        # seed Eq. 6: (1−μ)·SA + μ·h = SA + μ·(h − SA)
        return self.log_z1(layer, query_bhtd), self.h(layer, query_bhtd) - attn_bhtd


def build_heads(n_layers: int, n_heads: int, head_dim: int, masked_log_z2: bool = True, shift: str = "mimic",
                mu: str = "query") -> MimicHeads:
    return MimicHeads(n_layers, n_heads, head_dim, masked_log_z2, shift, mu)


def log_z2(query_bhtd, key_bksd, attention_mask, scaling: float, masked: bool) -> torch.Tensor:
    """log Σ_k exp(s·q·k) over the keys each query may attend to (causal + padding; the cache in generation)."""
    n_rep = query_bhtd.shape[1] // key_bksd.shape[1]
    key_bhsd = key_bksd.repeat_interleave(n_rep, dim=1)  # grouped-query attention: one key head serves n_rep query heads
    acc = torch.promote_types(query_bhtd.dtype, torch.float32)  # half precision accumulates in fp32
    scores_bhts = torch.einsum("bhtd,bhsd->bhts", query_bhtd.to(acc), key_bhsd.to(acc)) * scaling
    if masked:
        t, s = scores_bhts.shape[-2:]
        if attention_mask is None:
            # A purely causal batch may arrive without a mask (sdpa skips it); the queries are the last t keys.
            attention_mask = torch.ones(t, s, dtype=torch.bool, device=scores_bhts.device).tril(s - t)
        if attention_mask.dtype == torch.bool:
            scores_bhts = scores_bhts.masked_fill(~attention_mask, float("-inf"))
        else:
            scores_bhts = scores_bhts + attention_mask.to(acc)
    return torch.logsumexp(scores_bhts, dim=-1)


def gate(log_z1_bht, query_bhtd, key_bksd, attention_mask, scaling, masked=True, mu="query") -> torch.Tensor:
    """μ̃ [b,h,t] (broadcastable): σ(log Z1 − log Z2) per head; with a shared gate log Z2 averaged over the heads;
    a constant gate is σ(log Z1) with no log Z2 in it (see MimicHeads)."""
    if mu == "constant":
        return torch.sigmoid(log_z1_bht.to(torch.promote_types(query_bhtd.dtype, torch.float32)))
    log_z2_bht = log_z2(query_bhtd, key_bksd, attention_mask, scaling, masked)
    if mu == "shared":
        log_z2_bht = log_z2_bht.mean(dim=1, keepdim=True)
    return torch.sigmoid(log_z1_bht.to(log_z2_bht.dtype) - log_z2_bht)


def shifted_attention(attn_bhtd, query_bhtd, key_bksd, attention_mask, scaling, log_z1_bht, shift_bhtd, masked=True,
                      mu="query"):
    """SA(q,K,V) + μ̃·shift: the MimIC head with any stand-ins for log Z1 and the shift."""
    mu_bht = gate(log_z1_bht, query_bhtd, key_bksd, attention_mask, scaling, masked, mu)
    return attn_bhtd + (mu_bht.unsqueeze(-1) * shift_bhtd.to(mu_bht.dtype)).to(attn_bhtd.dtype)


# module -> (heads, layer index). Weak keys: dropping a model drops its entries.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, tuple[object, int]]" = weakref.WeakKeyDictionary()


def mimic_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Drop-in for transformers' SDPA attention: (B,H,T,D) q and (B,H_kv,S,D) k/v in, (B,T,H,D) out."""
    out_bthd, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    attached = _ATTACHED.get(module)
    if attached is None:
        return out_bthd, weights
    heads, layer = attached
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    attn_bhtd = out_bthd.transpose(1, 2)
    log_z1_bht, shift = heads.layer_terms(layer, query, attn_bhtd)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask.expand(-1, query.shape[1], -1, -1)
    shifted_bhtd = shifted_attention(attn_bhtd, query, key, mask, scaling, log_z1_bht, shift,
                                     masked=getattr(heads, "masked_log_z2", True), mu=getattr(heads, "mu", "query"))
    return shifted_bhtd.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION_NAME, mimic_attention)
# Without a mask function of its own a custom name gets attention_mask=None (toy_icl_findings.md, pitfall 4).
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attach(lm, heads, replace: bool = False) -> None:
    """Put `heads` (MimicHeads, or any object with layer_terms) on every decoder self-attention of a loaded model.

    MimicHeads are cast in place to the model's dtype and device, so the caller's module (and an optimizer
    made from it afterwards) is the one attached. Heads attached earlier are replaced only with replace=True:
    a second attach by mistake would otherwise silently drop the first heads.
    """
    layers = lm.adapter.decoder_layers(lm.model)
    if not replace and any(layer.self_attn in _ATTACHED for layer in layers):
        raise RuntimeError("MimIC heads are already attached to this model; detach(lm) first, or attach(lm, heads, "
                           "replace=True) to swap them")
    if isinstance(heads, nn.Module):
        heads.to(device=lm.model.device, dtype=lm.model.dtype)
    for i, layer in enumerate(layers):
        _ATTACHED[layer.self_attn] = (heads, i)
    lm.adapter.use_attention(lm.model, ATTENTION_NAME)


def detach(lm) -> None:
    for layer in lm.adapter.decoder_layers(lm.model):
        _ATTACHED.pop(layer.self_attn, None)


def attached_heads(lm):
    """The heads attached to `lm`'s decoder (one object serves every layer), or None."""
    entry = _ATTACHED.get(lm.adapter.decoder_layers(lm.model)[0].self_attn)
    return entry[0] if entry else None


def save_heads(heads: MimicHeads, dpath: str, meta: dict) -> None:
    """Weights as safetensors (never a pickle) and a JSON config with the shapes and where they came from."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(dpath, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(tensors, os.path.join(dpath, "heads.safetensors"))
    config = {**heads.config(), **meta}
    with open(os.path.join(dpath, "heads.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_heads(dpath: str, lm) -> MimicHeads:
    """Heads saved by `save_heads`, refused unless their shapes fit the loaded model `lm`."""
    import json
    import os

    from safetensors.torch import load_file

    from stages.errors import UserError
    from stages.models.provenance import check_base_model

    config_fpath, weights_fpath = os.path.join(dpath, "heads.json"), os.path.join(dpath, "heads.safetensors")
    if not (os.path.isfile(config_fpath) and os.path.isfile(weights_fpath)):
        raise UserError(f"no MimIC heads in {dpath} (expected heads.json and heads.safetensors; "
                        "train them with `pipeline run student`)")
    try:
        config = json.load(open(config_fpath))
        shape = (config["n_layers"], config["n_heads"], config["head_dim"])
        masked = config["masked_log_z2"]
        kind = {"shift": config.get("shift", "mimic"), "mu": config.get("mu", "query")}  # heads saved before the ablations
        assert kind["shift"] in SHIFTS and kind["mu"] in GATES, kind
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"{config_fpath} is not a heads config written by `pipeline run student` ({e})") from None
    dims = lm.dims
    if shape != (dims.n_layers, dims.n_heads, dims.head_dim):
        raise UserError(f"heads in {dpath} are for {shape[0]} layers x {shape[1]} heads x {shape[2]} dims, the model "
                        f"{lm.path} has {dims.n_layers} x {dims.n_heads} x {dims.head_dim}; use heads trained on it")
    check_base_model(config.get("base_model"), lm, dpath)
    heads = build_heads(*shape, masked, **kind)
    heads.load_state_dict(load_file(weights_fpath))
    return heads
