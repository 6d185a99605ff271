"""Idefics3 (Idefics3ForConditionalGeneration): a Llama decoder reading pixel-shuffled image tokens.

The same contract as Idefics2; only how an image is written into the text differs.
"""
from __future__ import annotations

from transformers import Idefics3ForConditionalGeneration

from stages.models import idefics2

FAMILY = "idefics3"
IMAGE_TOKEN = "<image>"
MODEL_CLASS = Idefics3ForConditionalGeneration

# The language model, its layers and the pixel inputs are laid out as in Idefics2.
decoder_layers = idefics2.decoder_layers
dims = idefics2.dims
use_attention = idefics2.use_attention
model_inputs = idefics2.model_inputs


def prepare_processor(processor) -> None:
    # One global image per picture, no tiles: the analogue of Idefics2 without splitting (METHOD.md §3).
    processor.image_processor.do_image_splitting = False


def image_text(processor) -> str:
    """What Idefics3Processor writes for an image that is not split into tiles."""
    fake, image = processor.fake_image_token, processor.image_token
    return f"{fake}{processor.global_image_tag}{image * processor.image_seq_len}{fake}"


def prompt_text(processor, pieces) -> str:
    return "".join(p if isinstance(p, str) else image_text(processor) for p in pieces)
