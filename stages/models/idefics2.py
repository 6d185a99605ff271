"""Idefics2 (Idefics2ForConditionalGeneration): a Mistral decoder reading perceiver-pooled image tokens."""
from __future__ import annotations

import re

import torch
from PIL import Image
from transformers import Idefics2ForConditionalGeneration

from stages.models.common import Dims, left_pad

FAMILY = "idefics2"
IMAGE_TOKEN = "<image>"  # the placeholder token(s) an image occupies in the sequence
MODEL_CLASS = Idefics2ForConditionalGeneration


def prepare_processor(processor) -> None:
    # Image splitting off: 64 visual tokens per image, as the authors ran it (METHOD.md §3).
    processor.image_processor.do_image_splitting = False


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.model.text_model.layers)


def dims(model) -> Dims:
    c = model.config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Dims(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim, c.hidden_size)


def image_text(processor) -> str:
    """The text one image stands for in the token sequence (what Idefics2Processor expands `<image>` into)."""
    fake, image = processor.fake_image_token, processor.image_token
    return f"{fake}{image * processor.image_seq_len}{fake}"


def prompt_text(processor, pieces) -> str:
    """As Idefics2Processor expands them: each image as its tokens, and a space after an image when a word follows."""
    text = "".join(p if isinstance(p, str) else image_text(processor) for p in pieces)
    fake = processor.fake_image_token
    return re.sub(rf"{re.escape(fake)}(?=[^\s<])", f"{fake} ", text)


def use_attention(model, name: str) -> None:
    # Scoped to the language model: the vision encoder and the perceiver keep their own attention.
    model.set_attn_implementation({"text_config": name})


def model_inputs(processor, ids: list[list[int]], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
    """Left-padded inputs for token ids that already hold the expanded image tokens."""
    input_ids, attention_mask, position_ids = left_pad(ids, processor.tokenizer.pad_token_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if any(images):
        pixels = processor.image_processor(images, return_tensors="pt")
        inputs["pixel_values"] = pixels["pixel_values"]
        inputs["pixel_attention_mask"] = pixels["pixel_attention_mask"]
    return inputs
