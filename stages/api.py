"""A student's trained artifact in your own code: an ordinary transformers model with it on (README, Python API).

    model, processor = load_with_heads(model_path, "runs/student-vqav2-32shot")
    inputs = prompt_inputs(model, processor, images, questions)
    answers = decode(processor, model.generate(**inputs, **generation_kwargs(processor)), inputs)

Any method's artifact loads through the one call (stages/methods reads method.json). MimIC heads become a
submodule of the model (`model.mimic_heads`), so `.to(device)`, `.half()` and `save_pretrained` take them
along; the attention function still finds them through the registry training uses (stages/models/heads.py),
which holds the same module object. prompt_inputs, generation_kwargs and decode are the ones
`pipeline eval` uses, so these three lines reproduce its predictions.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pipeline.config import EvalConfig
from stages import evaluate
from stages.methods import load_artifact
from stages.methods.live import MODULE_NAME as LIVE_MODULE
from stages.models import FAMILIES, LoadedModel, load_model
from stages.models.encode import encode
from stages.models.heads import MimicHeads, attach, attached_heads, detach
from stages.models.prompt import attach_prompt, attached_prompt, detach_prompt
from stages.tasks import get_task
from stages.tasks.prompts import build_prompt
from stages.tasks.sample import Sample

HEADS_NAME = "mimic_heads"  # the heads' name as a submodule of the model (and in its state_dict)
VIRTUAL_KV_NAME, PROMPT_NAME = "virtual_kv", "prompt"  # virtual-kv's pairs and prompt tuning's vectors, likewise


def load_with_heads(model_path: str, artifact_dpath: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, processor): the base model at `model_path` with the artifact of the student run in
    `artifact_dpath` on it (its output directory, holding method.json). Refused, in one line naming both, when
    the artifact was trained on another base model."""
    lm = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    load_artifact(artifact_dpath, lm)  # refused there if it was trained on another base model
    if isinstance(heads := attached_heads(lm), nn.Module):
        lm.model.add_module(HEADS_NAME if isinstance(heads, MimicHeads) else VIRTUAL_KV_NAME, heads)
    if (prompt := attached_prompt(lm)) is not None:
        lm.model.add_module(PROMPT_NAME, prompt)
    lm.model.requires_grad_(False)  # frozen as a whole, as load_model leaves the base model
    return lm.model, lm.processor


def _loaded(model, processor=None) -> LoadedModel:
    """The pipeline's view of a transformers model: its family's adapter picks the decoder layers and prompts."""
    family = model.config.model_type
    return LoadedModel(family, FAMILIES[family], model, processor, model.name_or_path)


@contextmanager
def heads_off(model):
    """Inside the block the model is the base model: MimIC heads (or virtual keys and values) detached, LoRA
    adapters disabled, LIVE's shift off, prompt tuning's prompt off (inputs built inside the block have no virtual tokens, and inputs
    with them are refused there)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    lm = _loaded(model)
    heads = attached_heads(lm)
    lora = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    trainable = {p: p.requires_grad for m in lora for p in m.parameters()}  # peft's enable_adapters sets them
    detach(lm)
    prompt = detach_prompt(lm)
    live = getattr(model, LIVE_MODULE, None)
    if live is not None:
        live.enabled = False
    for m in lora:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        if heads is not None:
            attach(lm, heads)
        if prompt is not None:
            attach_prompt(lm, prompt)
        if live is not None:
            live.enabled = True
        for m in lora:
            m.enable_adapters(True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def prompt_inputs(model, processor, images: list, questions: list[str | None], task: str = "vqav2",
                  options: list[tuple[str, ...]] | None = None, mode: str = "mimic") -> dict[str, torch.Tensor]:
    """Model inputs for a batch, on the model's device, as `pipeline eval` builds them: the seed's Tab. 6 prompt of
    `task`'s kind, [BOS] + query for a trained artifact (mode "mimic"), or "zero-shot" with the instruction.
    questions: None for captions; options: the option texts per query, for multiple-choice tasks."""
    kind = get_task(task).kind
    samples = [Sample(str(i), b"", q, (), tuple(options[i]) if options else ()) for i, q in enumerate(questions)]
    prompts = [build_prompt(kind, mode, s, [], load=lambda s: images[int(s.id)]) for s in samples]
    inputs = encode(_loaded(model, processor), prompts).inputs
    # generate() numbers positions from the attention mask itself (as evaluate.generate)
    return {k: v.to(model.device) for k, v in inputs.items() if k != "position_ids"}


def generation_kwargs(processor, task: str = "vqav2", num_beams: int = EvalConfig.num_beams) -> dict:
    """model.generate's settings in `pipeline eval`: beam search (3 beams), length penalty 0, the task's budget."""
    return evaluate.generation_kwargs(processor.tokenizer, max_new_tokens=get_task(task).max_new_tokens,
                                      num_beams=num_beams)


def decode(processor, out: torch.Tensor, inputs: dict, task: str = "vqav2") -> list[str]:
    """The answers in generate's output, cut at the task's stop words as `pipeline eval` cuts them."""
    return evaluate.decode(processor.tokenizer, out, inputs["input_ids"].shape[1], get_task(task).stop_words)
