"""Virtual keys and values, a teacher-free attention baseline in the spirit of HiFICL (Li et al., "HIFICL: High-Fidelity
In-Context Learning for Multimodal Tasks", CVPR 2026, arXiv 2603.12760): per decoder layer l and query head h, n
learned key/value pairs joined to the keys and values of the self-attention, visible to every query position (no
causal mask on them) and never masked by padding. Trained on L_gt at student.lr (5e-3); w_align is 0 unless set
(pipeline/config.py METHOD_DEFAULTS), and L_align is taken as for every method when it is set.

Parametrisation (HiFICL's AttnApproximatorDirect_final, github.com/bbbandari/HiFICL): the virtual keys and values of
a head are products of low-rank factors,

    K[l,h] = A_k[l,h] B_k[l,h],   V[l,h] = A_v[l,h] B_v[l,h],   A: n × r,  B: r × d_h,

A ~ N(0, 1), B_k ~ N(0, 0.01²), B_v = 0 (the virtual values start at 0). n = 8 pairs of rank r = 8, HiFICL's config
for Idefics (their encoder/hifi.yaml; their code's default rank is 4); at r = n the product spans every n × d_h
matrix, so the factors shape the optimisation, not the reach. Their learning rate, 5e-3 with CE only, is in their
Qwen3-VL config (peft/hifi.yaml): student.lr. Trainable parameters: layers × heads × 2r(n + d_h), 4 × 4 × 640 =
10,240 on the toy model, 32 × 32 × 2,176 = 2,228,224 on Idefics2-8b (MimIC's heads there: 263,168).

Attention over [virtual; real] keys splits exactly as the MimIC heads' (stages/models/heads.py, seed Eq. 6), with the
virtual pairs in the place of the demonstrations:

    SA(q, [K_v; K], [V_v; V]) = SA(q, K, V) + μ·(SA(q, K_v, V_v) − SA(q, K, V)),   μ = Z1 / (Z1 + Z2),

log Z1 = log Σ_v exp(s·q·k_v) over the virtual keys, log Z2 over the real keys each query may see. So these pairs
are an object with layer_terms (log Z1 and the shift, both exact here) on the MimIC heads' attention function: no
copied forward. Where HiFICL's code takes log Z2 over all keys, causal mask and padding ignored, this takes the
masked one, so the output is softmax attention over [virtual; visible real keys]. (A module carries these pairs
instead of MimIC heads; nothing combines the two.)
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stages.errors import UserError
from stages.models.heads import attach

LOSSES = ("align", "gt")
N_PAIRS, RANK = 8, 8
FNAME = "virtual_kv.safetensors"


class VirtualKV(nn.Module):
    """n virtual key/value pairs per layer and query head, K = A_k B_k and V = A_v B_v of rank r (module docstring)."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, scaling: float, n_pairs: int = N_PAIRS,
                 rank: int = RANK):
        super().__init__()
        self.key_a_lhnr = nn.Parameter(torch.randn(n_layers, n_heads, n_pairs, rank))
        self.key_b_lhrd = nn.Parameter(torch.randn(n_layers, n_heads, rank, head_dim) * 0.01)
        self.value_a_lhnr = nn.Parameter(torch.randn(n_layers, n_heads, n_pairs, rank))
        self.value_b_lhrd = nn.Parameter(torch.zeros(n_layers, n_heads, rank, head_dim))
        self.scaling = scaling  # the attention's own softmax scale, s in exp(s·q·k)

    def config(self) -> dict:
        n_layers, n_heads, n_pairs, rank = self.key_a_lhnr.shape
        return {"n_layers": n_layers, "n_heads": n_heads, "head_dim": self.key_b_lhrd.shape[-1], "n_pairs": n_pairs,
                "rank": rank, "scaling": self.scaling}

    def layer_terms(self, layer: int, query_bhtd: torch.Tensor, attn_bhtd: torch.Tensor):
        """(log Z1 over the virtual keys [b,h,t], SA(q, K_v, V_v) − SA(q, K, V) [b,h,t,d]), in float32 at least."""
        acc = torch.promote_types(query_bhtd.dtype, torch.float32)
        keys_hnd = (self.key_a_lhnr[layer] @ self.key_b_lhrd[layer]).to(acc)
        values_hnd = (self.value_a_lhnr[layer] @ self.value_b_lhrd[layer]).to(acc)
        scores_bhtn = torch.einsum("bhtd,hnd->bhtn", query_bhtd.to(acc), keys_hnd) * self.scaling
        virtual_bhtd = torch.einsum("bhtn,hnd->bhtd", scores_bhtn.softmax(-1), values_hnd)
        return scores_bhtn.logsumexp(-1), virtual_bhtd - attn_bhtd


def _scaling(lm) -> float:
    return lm.adapter.decoder_layers(lm.model)[0].self_attn.scaling


def add(lm, s) -> dict:
    dims = lm.dims
    pairs = VirtualKV(dims.n_layers, dims.n_heads, dims.head_dim, _scaling(lm))
    attach(lm, pairs)
    return {"virtual_kv": pairs}


def param_groups(parts: dict, s) -> list[dict]:
    return [{"params": list(parts["virtual_kv"].parameters()), "lr": s.lr}]


def save(parts: dict, state: dict, dpath: str, meta: dict) -> None:
    out = os.path.join(dpath, "virtual_kv")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["virtual_kv"].items()}, os.path.join(out, FNAME))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**parts["virtual_kv"].config(), **meta}, f, indent=2)


def load(dpath: str, lm) -> None:
    out = os.path.join(dpath, "virtual_kv")
    if not (os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, FNAME))):
        raise UserError(f"no virtual keys and values in {out} (expected config.json and {FNAME}; "
                        "train them with `pipeline run student --method virtual-kv`)")
    state = load_file(os.path.join(out, FNAME))
    n_layers, n_heads, n_pairs, rank = state["key_a_lhnr"].shape
    dims = lm.dims
    if (n_layers, n_heads, state["key_b_lhrd"].shape[-1]) != (dims.n_layers, dims.n_heads, dims.head_dim):
        raise UserError(f"the virtual keys in {out} are for {n_layers} layers x {n_heads} heads x "
                        f"{state['key_b_lhrd'].shape[-1]} dims, the model {lm.path} has {dims.n_layers} x "
                        f"{dims.n_heads} x {dims.head_dim}: evaluate them on the model they were trained on")
    pairs = VirtualKV(n_layers, n_heads, dims.head_dim, _scaling(lm), n_pairs, rank)
    pairs.load_state_dict(state)
    attach(lm, pairs)
