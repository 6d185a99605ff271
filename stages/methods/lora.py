"""LoRA (seed §7.2): r = 16 on W_q, W_k, W_v and W_o of every attention, vision encoder and perceiver included,
at student.lora_lr (5e-4). Through peft (stages/models/lora.py)."""
from __future__ import annotations

import os

from stages.models.lora import add_lora, attention_projections, load_lora, save_lora

LOSSES = ("align", "gt")
RANK = 16


def add(lm, s) -> dict:
    add_lora(lm, attention_projections(lm), RANK)
    return {"lora": lm.model}  # the model is frozen: its trainable parameters are the LoRA weights


def param_groups(parts: dict, s) -> list[dict]:
    return [{"params": [p for p in parts["lora"].parameters() if p.requires_grad], "lr": s.lora_lr}]


def save(parts: dict, state: dict, dpath: str, meta: dict) -> None:
    save_lora(parts["lora"], state["lora"], os.path.join(dpath, "lora"))


def load(dpath: str, lm) -> None:
    load_lora(os.path.join(dpath, "lora"), lm)
