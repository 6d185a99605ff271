"""Prompt tuning's virtual tokens (Lester et al., 2021) as ordinary positions of the input, on every family.

The n virtual tokens are the ids V, ..., V+n−1 just past the V ids the model's input embedding knows. The input
builders (stages/models/encode.py) put them right after BOS while the model carries a prompt, and two hooks on the
input embedding give those positions the prompt's n learned vectors. Everything else is the family's own: left
padding, positions that count real tokens only, where the image features go, Idefics' per-token
image_attention_mask, generate with beams and its cache. So a padded row equals the row alone, and evaluation is
`pipeline eval` unchanged. Nothing here copies a transformers forward.

peft's own wrapper (PeftModelForCausalLM, peft 0.21.2) does not serve these models, as tried on the tiny checkpoints:
it puts the virtual tokens in front of the left padding and drops position_ids, so a padded Idefics2/Idefics3 row
differs from the same row alone; it leaves Idefics' image_attention_mask n tokens short, so Idefics (9b) fails; and
it replaces the transformers model that generate, the attention registry and stages.api hand out. peft still makes
and initialises the vectors (PromptEmbedding), and the artifact is in its layout (stages/methods/prompt_tuning.py).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

# model -> its prompt (a peft PromptEmbedding) while the prompt is on. Weak keys: dropping a model drops its entry.
_PROMPTS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models whose input embedding has the hooks


def _n_ids(embed: nn.Module) -> int:
    """How many ids the input embedding looks up (Idefics' decoupled embedding has extra ones after the vocabulary)."""
    return embed.num_embeddings + getattr(embed, "num_additional_embeddings", 0)


def attached_prompt(lm):
    """The prompt on `lm`'s model, or None (none, or off)."""
    return _PROMPTS.get(lm.model)


def prompt_ids(model: nn.Module) -> list[int]:
    """The virtual tokens' ids, or [] when the model carries no prompt (or it is off)."""
    prompt = _PROMPTS.get(model)
    if prompt is None:
        return []
    base = _n_ids(model.get_input_embeddings())
    return list(range(base, base + prompt.embedding.num_embeddings))


def with_prompt(model: nn.Module, rows: list[list[int]]) -> list[list[int]]:
    """Rows of ids ([BOS] + ...) with the virtual tokens after BOS: they take the place the teacher's demonstrations
    had, and the model still sees BOS first, as in pretraining."""
    ids = prompt_ids(model)
    return [row[:1] + ids + row[1:] for row in rows] if ids else rows


def _hook(model: nn.Module) -> None:
    """Map virtual ids to a valid id before the lookup, and their rows to the prompt's vectors after it."""
    embed, owner = model.get_input_embeddings(), weakref.ref(model)
    found: list = []  # the virtual positions of the lookup in flight, from the pre-hook to the hook

    def before(module, args):
        ids, base = args[0], _n_ids(module)
        virtual = ids >= base
        if _PROMPTS.get(owner()) is None and virtual.any():
            raise ValueError("these inputs hold prompt tuning's virtual tokens but the model's prompt is off "
                             "(heads_off): build the inputs while it is off, or after the block")
        found.append((virtual, ids - base))
        return (ids.masked_fill(virtual, 0), *args[1:])

    def after(module, args, out):
        virtual, index = found.pop()
        prompt = _PROMPTS.get(owner())
        if prompt is None or not virtual.any():
            return out
        vectors = prompt.embedding.weight[index.clamp(0, prompt.embedding.num_embeddings - 1)]
        return torch.where(virtual[..., None], vectors.to(out.dtype), out)

    embed.register_forward_pre_hook(before)
    embed.register_forward_hook(after)
    _HOOKED.add(model)


def attach_prompt(lm, prompt: nn.Module) -> None:
    """Put `prompt` (a peft PromptEmbedding) on a loaded model, cast in place to its dtype and device, so the caller's
    module (and an optimizer made from it afterwards) is the one the model reads."""
    if lm.model in _PROMPTS:
        raise RuntimeError("a prompt is already on this model; detach_prompt(lm) first")
    prompt.to(device=lm.model.device, dtype=lm.model.dtype)
    if lm.model not in _HOOKED:
        _hook(lm.model)
    _PROMPTS[lm.model] = prompt


def detach_prompt(lm):
    """Take the prompt off (inputs are built without virtual tokens); returns it, or None."""
    return _PROMPTS.pop(lm.model, None)
