"""MimIC (METHOD.md §2): heads on every decoder self-attention, trained at student.lr; the ablations of seed
Tab. 8 (student.shift, student.mu) are options of the same heads."""
from __future__ import annotations

import os

from stages.models.heads import attach, build_heads, load_heads, save_heads

LOSSES = ("align", "gt")


def add(lm, s) -> dict:
    """Fresh heads, or with student.heads_from the trained heads of an earlier run to go on from (the seed's
    MimIC + LoRA trains one epoch on top of trained MimIC heads)."""
    dims = lm.dims
    if s.heads_from:
        heads = load_heads(s.heads_from, lm)
    else:
        heads = build_heads(dims.n_layers, dims.n_heads, dims.head_dim, masked_log_z2=s.log_z2 == "masked",
                            shift=s.shift, mu=s.mu)
    attach(lm, heads)
    return {"heads": heads}


def param_groups(parts: dict, s) -> list[dict]:
    return [{"params": list(parts["heads"].parameters()), "lr": s.lr}]


def save(parts: dict, state: dict, dpath: str, meta: dict) -> None:
    heads = build_heads(**parts["heads"].config())
    heads.load_state_dict(state["heads"])
    save_heads(heads, os.path.join(dpath, "heads"), meta)


def load(dpath: str, lm) -> None:
    attach(lm, load_heads(os.path.join(dpath, "heads"), lm))
