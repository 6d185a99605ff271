"""LoRA through peft (METHOD.md §5, seed §7.2): which projections get adapters, and the artifact on disk.

The adapters are injected into the loaded model in place (peft.inject_adapter_in_model), so the model keeps its
class, its generate() and its attention registry: MimIC heads and LoRA can sit on the same model. The artifact is
peft's own layout (adapter_config.json + adapter_model.safetensors), so `PeftModel.from_pretrained` reads it too.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from stages.errors import UserError

# Query, key, value and output projections as the families name them: the language model and the perceiver
# use o_proj, the SigLIP/CLIP vision encoders out_proj, Idefics' perceiver output_proj.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "output_proj")
DROPOUT = 0.05  # seed §7.2, with α = 2r


def attention_projections(lm) -> list[str]:
    """Every attention's W_q, W_k, W_v and W_o: language model, vision encoder, perceiver/connector, and Idefics'
    gated cross-attention (the authors' suffix match takes it too)."""
    return [name for name, m in lm.model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS]


def lm_output_projections(lm) -> list[str]:
    """W_o of each decoder self-attention of the language model (LoRA†)."""
    names = {m: name for name, m in lm.model.named_modules()}
    return [names[layer.self_attn.o_proj] for layer in lm.adapter.decoder_layers(lm.model)]


def add_lora(lm, targets: list[str], r: int):
    """Inject LoRA of rank r into the named linear layers; only the LoRA weights train (the model stays frozen).

    Dropout acts only while the LoRA layers are in training mode; the base model stays in eval mode."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=DROPOUT, target_modules=targets)
    inject_adapter_in_model(config, lm.model)
    for module in _lora_layers(lm):
        module.lora_dropout.train()
    return config


def _lora_layers(lm) -> list[nn.Module]:
    """The layers peft wrapped, with their adapters cast to the model's dtype (peft keeps them in fp32 under
    bf16/fp16; the model's own buffers, such as RoPE's, are left as they are)."""
    layers = [m for m in lm.model.modules() if hasattr(m, "lora_A")]
    for m in layers:
        m.lora_A.to(lm.model.dtype)
        m.lora_B.to(lm.model.dtype)
    return layers


def save_lora(model, state: dict[str, torch.Tensor], dpath: str) -> None:
    """`state`: the LoRA weights by the model's parameter names (fp32 masters), written in peft's layout."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    os.makedirs(dpath, exist_ok=True)
    tensors = get_peft_model_state_dict(model, state_dict=state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dpath, "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(dpath)


def load_lora(dpath: str, lm) -> None:
    """Put LoRA saved by `save_lora` on a loaded model, refused unless every weight finds its place."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    weights_fpath = os.path.join(dpath, "adapter_model.safetensors")
    if not (os.path.isfile(os.path.join(dpath, "adapter_config.json")) and os.path.isfile(weights_fpath)):
        raise UserError(f"no LoRA in {dpath} (expected adapter_config.json and adapter_model.safetensors; "
                        "train it with `pipeline run student --set student.method=lora`)")
    # Read as peft's from_pretrained reads a local directory (a JSON file, never code).
    config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**LoraConfig.from_json_file(
        os.path.join(dpath, "adapter_config.json"))))
    try:
        inject_adapter_in_model(config, lm.model)
        result = set_peft_model_state_dict(lm.model, load_file(weights_fpath))
    except (ValueError, RuntimeError) as e:  # a target the model lacks, or a shape of another model
        raise UserError(f"LoRA in {dpath} does not fit the model {lm.path}: {str(e).splitlines()[0]}") from None
    if result.unexpected_keys:
        raise UserError(f"LoRA in {dpath} does not fit the model {lm.path}: no place for {result.unexpected_keys[0]}")
    _lora_layers(lm)
    lm.model.requires_grad_(False)
    lm.model.eval()  # peft's new layers start in training mode: their dropout would draw masks at evaluation
