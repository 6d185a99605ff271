"""MimIC + LoRA (seed Tab. 12): both parts on one model, two parameter groups (heads at student.lr, LoRA at
student.lora_lr). Trained jointly from fresh heads, or, as the seed, for one epoch on top of trained MimIC heads
(student.heads_from=<a MimIC run>/heads, student.epochs=1)."""
from __future__ import annotations

from stages.methods import lora, mimic

LOSSES = ("align", "gt")


def add(lm, s) -> dict:
    return {**mimic.add(lm, s), **lora.add(lm, s)}


def param_groups(parts: dict, s) -> list[dict]:
    return mimic.param_groups(parts, s) + lora.param_groups(parts, s)


def save(parts: dict, state: dict, dpath: str, meta: dict) -> None:
    mimic.save(parts, state, dpath, meta)
    lora.save(parts, state, dpath, meta)


def load(dpath: str, lm) -> None:
    mimic.load(dpath, lm)
    lora.load(dpath, lm)
