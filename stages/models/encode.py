"""Prompts to model inputs, keeping track of the query + answer span.

The text of a prompt is tokenized once, as a whole, so the span's ids are exactly the ids the model
sees in context; the context alone is tokenized too, only to know where the span starts. Model
inputs are then built from ids (the same way for the teacher's k-shot sequence, the student's
stored span and evaluation), so every stage feeds the model through one function per family.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from stages.errors import UserError
from stages.models import LoadedModel
from stages.models.prompt import with_prompt
from stages.tasks.prompts import Piece, Prompt


def prompt_text(lm: LoadedModel, pieces: tuple[Piece, ...]) -> str:
    """The text the family's processor would build for these pieces (without BOS), images expanded.

    tests/test_prompts.py checks the parity with each family's processor.
    """
    return lm.adapter.prompt_text(lm.processor, pieces)


def tokenize(lm: LoadedModel, prompt: Prompt) -> tuple[list[int], int]:
    """Ids of [BOS] + context + query (+ EOS) and the index where the query span starts."""
    tok = lm.tokenizer
    ids_ctx = tok(prompt_text(lm, prompt.context), add_special_tokens=False)["input_ids"]
    ids = tok(prompt_text(lm, prompt.context + prompt.query), add_special_tokens=False)["input_ids"]
    if ids[: len(ids_ctx)] != ids_ctx:
        # A merge across the context/query boundary would make the span ill-defined.
        raise UserError("the tokenizer merges the last context token with the query; the prompt template "
                        "must end the context on a token boundary (e.g. a newline)")
    ids = [tok.bos_token_id] + ids + ([tok.eos_token_id] if prompt.with_eos else [])
    return ids, 1 + len(ids_ctx)


def text_mask(lm: LoadedModel, span_ids: list[int]) -> np.ndarray:
    """True for the span's text tokens, False for image placeholder tokens (the "text" span, METHOD.md §3)."""
    image_id = lm.tokenizer.convert_tokens_to_ids(lm.adapter.IMAGE_TOKEN)
    return np.asarray(span_ids) != image_id


@dataclass
class Encoded:
    inputs: dict[str, torch.Tensor]  # left-padded model inputs
    span_ids: list[list[int]]        # per row: ids of the query (+ answer + EOS) span
    span_lens: list[int]             # the span is the last span_lens[b] positions of row b


def encode(lm: LoadedModel, prompts: list[Prompt], max_len: int | None = None) -> Encoded:
    """Model inputs for a batch of prompts; with drop_context, a row is [BOS] + span (with prompt tuning's virtual
    tokens after BOS while the model carries a prompt: stages/models/prompt.py)."""
    rows, spans, images = [], [], []
    for p in prompts:
        ids, start = tokenize(lm, p)
        if max_len is not None and len(ids) > max_len:
            raise UserError(f"a prompt of {len(ids)} tokens exceeds the model's context of {max_len} tokens")
        pieces = p.query if p.drop_context else p.context + p.query
        rows.append([ids[0]] + ids[start:] if p.drop_context else ids)
        spans.append(ids[start:])
        images.append([x for x in pieces if isinstance(x, Image.Image)])
    inputs = lm.adapter.model_inputs(lm.processor, with_prompt(lm.model, rows), images)
    return Encoded(inputs, spans, [len(s) for s in spans])


def inputs_from_spans(lm: LoadedModel, span_ids: list[list[int]], images: list[list[Image.Image]]) -> dict:
    """The student's zero-shot sequence [BOS] + stored span, with the query's images (METHOD.md §4); with prompt
    tuning, its virtual tokens after BOS."""
    rows = [[lm.tokenizer.bos_token_id] + list(s) for s in span_ids]
    return lm.adapter.model_inputs(lm.processor, with_prompt(lm.model, rows), images)
