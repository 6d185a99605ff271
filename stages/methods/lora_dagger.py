"""LoRA† (seed §9.3): W_o of the language model's self-attention only, r = 1, so that its parameter count
(layers × (d + d)) is close to MimIC's and, like MimIC, it changes only what enters each layer's FFN."""
from __future__ import annotations

from stages.methods.lora import LOSSES, load, param_groups, save  # noqa: F401  (the same training and artifact)
from stages.models.lora import add_lora, lm_output_projections

RANK = 1


def add(lm, s) -> dict:
    add_lora(lm, lm_output_projections(lm), RANK)
    return {"lora": lm.model}
