"""Prompt tuning (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021), a teacher-free
baseline ([compare]): n learned input vectors, the virtual tokens, between BOS and the query, trained on L_gt at
student.prompt_lr (3e-2). The vectors are peft's (PromptTuningConfig, PromptEmbedding); the model reads them
through stages/models/prompt.py, since peft's PeftModelForCausalLM does not serve the Idefics families (see there).

n = 8 virtual tokens, at lr 3e-2: the setting of peft's causal-LM prompt-tuning guide
(huggingface.co/docs/peft/v0.6.0/task_guides/clm-prompt-tuning), and as many learned context positions as
virtual-kv's 8 key/value pairs (HiFICL's setting), so the two teacher-free methods learn the same number of
positions, one at the input, one in every attention. (STAVE learns two input-embedding vectors; we found no public
setting for the prompt tuning its authors reran, 72.75 on Idefics2 VQAv2.) Trainable parameters: n·d, 8 × 128 =
1,024 on the toy model, 8 × 4,096 = 32,768 on Idefics2-8b. Initialised as peft's SAMPLE_VOCAB: the embeddings of n
vocabulary tokens drawn with student.seed, so the vectors start where the model's own token embeddings are.

L_align (w_align > 0; 0 unless set, pipeline/config.py METHOD_DEFAULTS): the virtual tokens sit after BOS, where the
teacher's demonstrations were, and the span keeps its place at the end of the row, so stored span position j lines
up with the student's span position j as for every method (make_batch aligns from the end).

The artifact is peft's prompt-tuning layout: prompt/adapter_config.json and prompt/adapter_model.safetensors with
the vectors under "prompt_embeddings". (peft's own loader would read it, and place the tokens its own way.)
"""
from __future__ import annotations

import os

from safetensors.torch import load_file, save_file

from stages.errors import UserError
from stages.models.prompt import attach_prompt

LOSSES = ("align", "gt")
N_TOKENS = 8
WEIGHTS_FNAME = "adapter_model.safetensors"
KEY = "prompt_embeddings"  # peft's name for the vectors in a prompt-tuning adapter


def _config(n_tokens: int, d_model: int, trained: bool = True):
    """peft's config of a prompt of n vectors in R^d; a fresh one (trained=False) draws them from the vocabulary."""
    from peft import PromptTuningConfig
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_tokens, token_dim=d_model,
                              num_transformer_submodules=1, prompt_tuning_init="SAMPLE_VOCAB", inference_mode=trained)


def add(lm, s) -> dict:
    from peft import PromptEmbedding
    prompt = PromptEmbedding(_config(N_TOKENS, lm.dims.d_model, trained=False), lm.model.get_input_embeddings())
    attach_prompt(lm, prompt)
    return {"prompt": prompt}


def param_groups(parts: dict, s) -> list[dict]:
    return [{"params": list(parts["prompt"].parameters()), "lr": s.prompt_lr}]


def save(parts: dict, state: dict, dpath: str, meta: dict) -> None:
    out = os.path.join(dpath, "prompt")
    os.makedirs(out, exist_ok=True)
    vectors = state["prompt"]["embedding.weight"]
    save_file({KEY: vectors.contiguous()}, os.path.join(out, WEIGHTS_FNAME))
    _config(*vectors.shape).save_pretrained(out)


def load(dpath: str, lm) -> None:
    from peft import PromptEmbedding
    out = os.path.join(dpath, "prompt")
    weights_fpath = os.path.join(out, WEIGHTS_FNAME)
    if not (os.path.isfile(os.path.join(out, "adapter_config.json")) and os.path.isfile(weights_fpath)):
        raise UserError(f"no prompt in {out} (expected adapter_config.json and {WEIGHTS_FNAME}; "
                        "train it with `pipeline run student --method prompt-tuning`)")
    vectors = load_file(weights_fpath)[KEY]
    if vectors.shape[1] != lm.dims.d_model:
        raise UserError(f"the prompt in {out} has vectors of {vectors.shape[1]} dims, the model {lm.path} embeds in "
                        f"{lm.dims.d_model}: evaluate it on the model it was trained on")
    prompt = PromptEmbedding(_config(*vectors.shape), lm.model.get_input_embeddings())
    prompt.embedding.weight.data.copy_(vectors)
    attach_prompt(lm, prompt)
