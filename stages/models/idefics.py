"""Idefics-9b (IdeficsForVisionText2Text): a Llama decoder with gated cross-attention to the images.

Images are not tokens of the sequence here: `<image>` marks where one was, and the image attention
mask lets each text token see only the image that precedes it (METHOD.md §3).
"""
from __future__ import annotations

import torch
from PIL import Image
from transformers import IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids,
                                                            incremental_to_binary_attention_mask)

from stages.models.common import Dims, left_pad

FAMILY = "idefics"
IMAGE_TOKEN = "<image>"  # the placeholder token(s) an image occupies in the sequence
MODEL_CLASS = IdeficsForVisionText2Text


def prepare_processor(processor) -> None:
    pass


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.model.layers)


def dims(model) -> Dims:
    c = model.config
    return Dims(c.num_hidden_layers, c.num_attention_heads, c.num_attention_heads,
                c.hidden_size // c.num_attention_heads, c.hidden_size)


def image_text(processor) -> str:
    return "<fake_token_around_image><image><fake_token_around_image>"


def prompt_text(processor, pieces) -> str:
    """As IdeficsProcessor joins them: text pieces stripped of spaces, each image as its marker."""
    return "".join(p.strip(" ") if isinstance(p, str) else image_text(processor) for p in pieces)


def use_attention(model, name: str) -> None:
    # One config serves self- and gated cross-attention alike, so the attention function itself must
    # tell them apart (stages/models/heads.py does it by module).
    model.set_attn_implementation(name)


def model_inputs(processor, ids: list[list[int]], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
    """Left-padded inputs as IdeficsProcessor builds them, for token ids that already hold `<image>` markers."""
    input_ids, attention_mask, position_ids = left_pad(ids, processor.tokenizer.pad_token_id)
    n_max = max(1, max(len(row) for row in images))
    size = processor.image_processor.image_size
    pixel_values = torch.zeros(len(ids), n_max, 3, size, size)
    for b, row in enumerate(images):
        if row:
            pixel_values[b, : len(row)] = processor.image_processor(row, return_tensors="pt")  # a tensor here
    incremental, _ = image_attention_mask_for_packed_input_ids(input_ids, processor.tokenizer, "pt")
    image_attention_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=n_max)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "pixel_values": pixel_values,
            "image_attention_mask": image_attention_mask}
