"""Model families: one adapter module each, loaded through one path for real and tiny checkpoints alike.

An adapter is a module with the functions of `Adapter` below; adding a family is one such file plus
a line in FAMILIES. Nothing here copies a transformers `forward`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
from PIL import Image

from stages.errors import UserError
from stages.models import idefics, idefics2, idefics3
from stages.models.common import Dims

FAMILIES: dict[str, ModuleType] = {"idefics": idefics, "idefics2": idefics2, "idefics3": idefics3}


class Adapter(Protocol):
    FAMILY: str
    MODEL_CLASS: type
    IMAGE_TOKEN: str

    def prepare_processor(self, processor) -> None: ...
    def decoder_layers(self, model) -> list[torch.nn.Module]: ...
    def dims(self, model) -> Dims: ...
    def image_text(self, processor) -> str: ...
    def prompt_text(self, processor, pieces) -> str: ...
    def use_attention(self, model, name: str) -> None: ...
    def model_inputs(self, processor, ids: list[list[int]], images: list[list[Image.Image]]) -> dict: ...


@dataclass
class LoadedModel:
    family: str
    adapter: Adapter
    model: torch.nn.Module
    processor: object
    path: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def dims(self) -> Dims:
        return self.adapter.dims(self.model)

    def identity(self) -> dict:
        """What identifies the weights and preprocessing, for store fingerprints (no file times, no absolute paths)."""
        return {"family": self.family, "name": os.path.basename(os.path.normpath(self.path)),
                "config": self.model.config.to_diff_dict(),
                "processor": json.loads(self.processor.to_json_string())}


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def family_of(path: str) -> str:
    config_fpath = os.path.join(path, "config.json")
    if not os.path.isfile(config_fpath):
        raise UserError(f"model directory {path} has no config.json (is it a transformers checkpoint?)")
    try:
        with open(config_fpath) as f:
            config = json.load(f)
    except ValueError as e:  # a copy cut short, or not text at all
        raise UserError(f"{config_fpath} is not valid JSON ({e}); is the model directory complete? "
                        "copy config.json again from the checkpoint") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in FAMILIES:
        raise UserError(f"{config_fpath}: unknown model family '{model_type}'; supported: {', '.join(sorted(FAMILIES))}")
    return model_type


def load_model(path: str, family: str = "auto", dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load a frozen model and its processor from a local directory (or a hub id where a network exists).

    trust_remote_code: let transformers run Python files shipped with the checkpoint; only when the user
    asks for it (model.trust_remote_code), since that code runs with the user's rights.
    """
    from transformers import AutoProcessor

    if not os.path.isdir(path):
        if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
            raise UserError(f"model directory not found: {path}")
        from huggingface_hub import snapshot_download  # a hub id such as HuggingFaceM4/idefics2-8b-base
        try:
            path = snapshot_download(path)
        except Exception as e:
            raise UserError(f"model '{path}' is neither a local directory nor reachable on the hub: {e}") from None
    detected = family_of(path)
    if family not in ("auto", detected):
        raise UserError(f"model in {path} is '{detected}' but the config asks for family '{family}'")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    has_processor = any(os.path.isfile(os.path.join(path, f)) for f in ("processor_config.json", "preprocessor_config.json"))
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    if not (has_processor and has_tokenizer):
        raise UserError(f"model directory {path} has no processor/tokenizer files "
                        "(expected processor_config.json or preprocessor_config.json, and tokenizer.json)")
    adapter = FAMILIES[detected]
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    adapter.prepare_processor(processor)
    model = adapter.MODEL_CLASS.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    return LoadedModel(detected, adapter, model, processor, path)
