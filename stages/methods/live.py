"""LIVE (METHOD.md §5; Peng et al., "LIVE: Learnable In-Context Vector for Visual Question Answering", NeurIPS 2024):
one vector v_l per decoder layer, added to the layer's MLP output f as f + σ(α_l)·v_l and rescaled to f's per-token
norm; trained with the KL divergence between the teacher's (k-shot ICL) and the student's next-token distributions
on the answer tokens, plus w_ce·L_gt, as the authors' runs (hard_loss_weight 0.5). The vectors train at student.lr
(5e-3) and the scales at 1e-2 (seed §7.2).

The KL follows the authors' code (github.com/ForJadeForest/LIVE-Learnable-In-Context-Vector,
icv_src/icv_module.py, `calculate_kl_divergence`): KL(teacher ‖ student) = Σ p_teacher·(log p_teacher − log p_student)
per answer position, averaged over the positions. Their temperature T divides both logits and multiplies the KL by T²;
its value is in a config file that their repository does not publish, so we take T = 1: the plain KL, and the only
temperature a store's logits (taken at temperature 1, with a top-k tail kept as one mass) serve exactly. Their
kl_eps, added inside each log, is left out: log-softmax needs no guard. The shift and rescaling follow their
icv_src/icv_model/icv_intervention.py, with σ on the scale as the MimIC paper describes LIVE (their runs left it off).

Needs a store with the teacher's logits (teacher.logits: topk:K or full; PROTOCOL.md, "Reserved: logits").
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from stages.errors import UserError

LOSSES = ("kl", "gt")
SCALE_LR = 1e-2  # the scales' learning rate (seed §7.2, "in accordance with the original paper")
FNAME = "live.safetensors"
MODULE_NAME = "live_vectors"  # a loaded artifact's vectors as a submodule of the model: they follow .to() and save_pretrained


class LiveVectors(torch.nn.Module):
    """v [L, d] and α [L]: LIVE's shift of every layer's MLP output. v starts as LIVE's (normal, std 0.01); α at 0,
    so σ(α) = 0.5."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.vector_ld = torch.nn.Parameter(torch.randn(n_layers, d_model) * 0.01)
        self.alpha_l = torch.nn.Parameter(torch.zeros(n_layers))
        self.enabled = True  # stages.api.heads_off turns the shift off

    def shift(self, layer: int, f_btd: torch.Tensor) -> torch.Tensor:
        """f + σ(α)·v, rescaled to the norm of f at every token (in float32 at least, returned in f's dtype)."""
        if not self.enabled:
            return f_btd
        f = f_btd.to(torch.promote_types(f_btd.dtype, torch.float32))
        shifted = f + torch.sigmoid(self.alpha_l[layer].to(f.dtype)) * self.vector_ld[layer].to(f.dtype)
        # clamp: a token whose shifted output is exactly 0 (f = −σ(α)·v) keeps 0 instead of NaN
        scale = f.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)
        return (shifted * scale).to(f_btd.dtype)


def attach(lm, live: LiveVectors) -> None:
    """Shift every decoder layer's MLP output with `live`, through forward hooks (nothing in the model changes)."""
    for i, layer in enumerate(lm.adapter.decoder_layers(lm.model)):
        layer.mlp.register_forward_hook(lambda m, args, out, i=i: live.shift(i, out))


def add(lm, s) -> dict:
    live = LiveVectors(lm.dims.n_layers, lm.dims.d_model).to(next(lm.model.parameters()).device)
    attach(lm, live)
    return {"live": live}


def param_groups(parts: dict, s) -> list[dict]:
    live = parts["live"]
    return [{"params": [live.vector_ld], "lr": s.lr}, {"params": [live.alpha_l], "lr": SCALE_LR}]


def kl_loss(logits_btv: torch.Tensor, items) -> torch.Tensor:
    """Mean over the answer positions of the items of KL(teacher ‖ student). The student's input is [BOS] + span,
    left-padded to t, so span position p sits at t − n + p; the teacher's row for p predicts the same token."""
    t, rows = logits_btv.shape[1], []
    for b, it in enumerate(items):
        at = torch.as_tensor(it.logits.pos, dtype=torch.long, device=logits_btv.device) + t - len(it.token_ids)
        rows.append(kl_rows(logits_btv[b, at], it.logits))
    return torch.cat(rows).mean()


def kl_rows(student_pv: torch.Tensor, teacher) -> torch.Tensor:
    """KL(teacher ‖ student) per row. A top-k store keeps the teacher's tail as one outcome (the "rest" bucket): KL
    over the K tokens and the rest, whose student mass is its probability outside the teacher's K tokens. Unlike
    renormalising over the K, this still penalises a student that moves mass out of the teacher's top K."""
    device = student_pv.device
    log_q = torch.log_softmax(student_pv.float(), dim=-1)
    values = teacher.values.to(device).float()
    if teacher.ids is None:  # full: the whole distribution
        log_p = torch.log_softmax(values, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    ids = torch.as_tensor(teacher.ids, dtype=torch.long, device=device)
    log_p = values - torch.as_tensor(teacher.lse, device=device)[:, None]
    head = (log_p.exp() * (log_p - log_q.gather(-1, ids))).sum(-1)
    p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)
    log_q_rest = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return head + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest


def save(parts: dict, state: dict, dpath: str, meta: dict) -> None:
    os.makedirs(os.path.join(dpath, "live"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["live"].items()}, os.path.join(dpath, "live", FNAME))
    with open(os.path.join(dpath, "live", "config.json"), "w") as f:
        json.dump({"n_layers": parts["live"].vector_ld.shape[0], "d_model": parts["live"].vector_ld.shape[1], **meta}, f,
                  indent=2)


def load(dpath: str, lm) -> None:
    state = load_file(os.path.join(dpath, "live", FNAME))
    if tuple(state["vector_ld"].shape) != (lm.dims.n_layers, lm.dims.d_model):
        raise UserError(f"{dpath}/live holds vectors of shape {tuple(state['vector_ld'].shape)} [layers, d]; this model "
                        f"has {lm.dims.n_layers} layers of {lm.dims.d_model}: evaluate it on the model it was trained on")
    live = LiveVectors(*state["vector_ld"].shape)
    live.load_state_dict(state)
    attach(lm, live.to(next(lm.model.parameters()).device))
    lm.model.add_module(MODULE_NAME, live)
