"""Small random-initialised checkpoints of the real families, for the tests and the benchmarks.

They are written with `save_pretrained` and read back through exactly the loading path a real
checkpoint takes (`stages.models.load_model`), so nothing downstream knows they are tiny.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from stages.errors import UserError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<fake_token_around_image>", "<end_of_utterance>"]
# Words of the prompt templates (seed Tab. 6) and of the synthetic tasks, so that a prompt is a few
# dozen tokens rather than hundreds of byte-level pieces.
CORPUS_WORDS = (
    "Instruction: provide an answer to the question. Use the image to answer.\n"
    "Instruction: provide a short caption of the input image.\n"
    "Image: Question: Answer: Caption: what color is the shape? what shape is it? how many shapes are there? "
    "red green blue yellow orange purple pink white black brown gray cyan square circle triangle "
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 yes no a an the of on in with and "
    "apple river stone cloud tiger piano lemon rocket A small large shape on a dark background there is picture"
)


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds (cpu_setup.md §2.1); ids 0..6 are the specials."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS_WORDS] * 50, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left", extra_special_tokens=["<image>", "<fake_token_around_image>", "<end_of_utterance>"])


def _idefics2(tok, hidden: int, layers: int, init_std: float):
    from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil,
                              Idefics2Processor)
    n_latents = 4
    config = Idefics2Config(
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        perceiver_config=dict(hidden_size=hidden, rms_norm_eps=1e-5, resampler_n_latents=n_latents,
                              resampler_depth=1, resampler_n_heads=4, resampler_head_dim=16, num_key_value_heads=2),
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, sliding_window=None, pad_token_id=3, bos_token_id=1,
                         eos_token_id=2, rms_norm_eps=1e-5, initializer_range=init_std))
    model = Idefics2ForConditionalGeneration(config)
    # The perceiver latents are initialised to ones, which makes every image the same vector
    # (notes/toy_icl_findings.md, pitfall 1); a random model should see its images.
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_(0, 0.02)
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=False,
                                                size={"longest_edge": 32, "shortest_edge": 32})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=n_latents)
    return model, processor


def _idefics(tok, hidden: int, layers: int, init_std: float):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor
    config = IdeficsConfig(
        vocab_size=len(tok), additional_vocab_size=0, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, cross_layer_interval=2, max_position_embeddings=4096,
        use_resampler=True, pad_token_id=3, bos_token_id=1, eos_token_id=2, initializer_range=init_std,
        alpha_initializer="ones",  # "normal" crashes in transformers 5.24 (cpu_setup.md §2.3)
        vision_config=dict(embed_dim=32, image_size=32, patch_size=16, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8))
    model = IdeficsForVisionText2Text(config)
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=32), tokenizer=tok, image_size=32)
    return model, processor


def _idefics3(tok, hidden: int, layers: int, init_std: float):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor)
    # Idefics3Processor looks up a global-image tag and the tile tokens <row_i_col_j>.
    tok.add_special_tokens({"additional_special_tokens": ["<global-img>"] + [
        f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]}, replace_extra_special_tokens=False)
    config = Idefics3Config(
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                         rms_norm_eps=1e-5, initializer_range=init_std))
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                max_image_size={"longest_edge": 32})
    # (32 / 8)^2 patches pixel-shuffled by 2x2: 4 image tokens per image.
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4)
    return model, processor


BUILDERS = {"idefics": _idefics, "idefics2": _idefics2, "idefics3": _idefics3}


def make_model(family: str, out_dpath: str, *, seed: int = 0, hidden: int = 64, layers: int = 4,
               init_std: float = 0.02) -> str:
    """Write a random-initialised checkpoint of `family` (config, weights, processor, tokenizer) to out_dpath."""
    if family not in BUILDERS:
        raise UserError(f"unknown model family '{family}'; choose one of: {', '.join(sorted(BUILDERS))}")
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model, processor = BUILDERS[family](tok, hidden, layers, init_std)
    # Written next to the target and renamed, so a crash never leaves a directory that looks complete.
    parent = os.path.dirname(os.path.abspath(out_dpath))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if os.path.exists(out_dpath):
        shutil.rmtree(out_dpath)
    os.replace(tmp, out_dpath)
    return out_dpath
