"""Stage-two methods (METHOD.md §5): one training loop (stages/student.py) serves them all.

A method is a module of this package with
  LOSSES                  the weighted losses it takes: "align" (w_align·L_align against the store's targets)
                          and "gt" (w_ce·L_gt); a weight of 0 drops a term; "kl" (weight 1: KL to the teacher's
                          answer-token distributions, kl_loss(logits, items); the store must hold them)
  add(lm, s)              what it adds to the frozen model, in place: its trained parts by name, each a module
                          whose trainable parameters are that part's ("heads": MimIC heads outside the model,
                          "lora": the model itself, where only the injected LoRA weights train; "live": LIVE's vectors;
                          "prompt": prompt tuning's virtual tokens; "virtual_kv": virtual keys and values)
  param_groups(parts, s)  what it trains, at which learning rate
  save(parts, state, dpath, meta)  its artifact, from `state`: per part, the fp32 master values of its
                          trainable parameters by name
  load(dpath, lm)         the artifact put back on a loaded model, for evaluation
The teacher-free baselines ([compare]), prompt-tuning and virtual-kv, take the same losses; their w_align is 0 unless
set (pipeline/config.py METHOD_DEFAULTS).
"""
from __future__ import annotations

import json
import os
from types import ModuleType

from stages.errors import UserError
from stages.methods import live, lora, lora_dagger, mimic, mimic_lora, prompt_tuning, virtual_kv
from stages.models.provenance import check_base_model

METHODS: dict[str, ModuleType] = {"mimic": mimic, "lora": lora, "lora-dagger": lora_dagger, "mimic+lora": mimic_lora,
                                  "live": live, "prompt-tuning": prompt_tuning, "virtual-kv": virtual_kv}
METHOD_FNAME = "method.json"  # in a student's output directory: which method made the artifact beside it


def save_artifact(method_name: str, parts: dict, state: dict, dpath: str, meta: dict) -> None:
    METHODS[method_name].save(parts, state, dpath, meta)
    with open(os.path.join(dpath, METHOD_FNAME), "w") as f:
        json.dump({"method": method_name, **meta}, f, indent=2)


def load_artifact(dpath: str, lm) -> str:
    """Put the artifact of the student run in `dpath` on `lm`; returns the method's name.

    A run from before method.json existed holds MimIC heads only."""
    fpath = os.path.join(dpath, METHOD_FNAME)
    meta = json.load(open(fpath)) if os.path.isfile(fpath) else {"method": "mimic"}
    name = meta["method"]
    if name not in METHODS:
        raise UserError(f"{fpath}: unknown method '{name}'; this version knows {', '.join(METHODS)}")
    check_base_model(meta.get("base_model"), lm, dpath)
    METHODS[name].load(dpath, lm)
    return name
