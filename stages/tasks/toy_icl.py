"""A meta-task that only in-context learning solves, written in the official VQAv2 format (issue 8).

Each image is one of 8 colours (the whole 16x16 image a solid colour with pixel noise, so recognising
the colour is easy and no image is ever uniform grey, which Idefics2 drops as padding). A "task" is a
permutation that maps the 8 colours to 8 answer words; the question never names it ("What is it?"),
so only the demonstrations reveal which word a colour stands for.

Permutations are numbered by a seed. Seeds 0 .. N_HELD_OUT-1 are the held-out tasks of the experiment:
pretraining (scripts/train_toy_icl.py) draws fresh random permutations and skips any that equals a
held-out one. `write_toy_icl`
writes one held-out permutation as a data set the normal pipeline reads (`task.name=vqav2`):

    train2014/, val2014/   COCO_{split}2014_{image_id:012d}.jpg (16x16 JPEG)
    v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json
    toy_icl.json           the parameters and the mapping; the set is complete when this file exists
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from functools import partial

import numpy as np
from PIL import Image

from stages.errors import UserError
from stages.tasks.prompts import VQA_INSTRUCTION

MARKER = "toy_icl.json"
FORMAT_VERSION = 1
# red, green, blue, yellow, orange, purple, pink, white (stages/tasks/synthetic.py's colours)
COLOURS = ((220, 40, 40), (40, 190, 60), (50, 90, 240), (240, 220, 40),
           (250, 140, 20), (160, 60, 210), (250, 130, 190), (245, 245, 245))
WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket")
QUESTION = "What is it?"
IMAGE_SIZE = 16
NOISE_STD = 8.0
N_HELD_OUT = 100       # permutation seeds 0..99 are held out from pretraining
DEFAULT_N_TRAIN = 256  # training queries (and support set) of a data set; also the embedded default's
_PERM_SALT = 0x7011C   # one random stream per purpose: permutations, the anchor, images, data sets
_ANCHOR_SALT = 0xA7C


def model_dpath() -> str:
    """The trained toy model (scripts/train_toy_icl.py), shipped with the package: the embedded default."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "toy_icl")


def permutation(seed: int) -> tuple[int, ...]:
    """Held-out task `seed`: colour c is answered with WORDS[perm[c]]."""
    return tuple(int(i) for i in np.random.default_rng([_PERM_SALT, seed]).permutation(len(COLOURS)))


def held_out_permutations() -> frozenset[tuple[int, ...]]:
    return frozenset(permutation(s) for s in range(N_HELD_OUT))


def anchor_permutation() -> tuple[int, ...]:
    """The fixed task of the anchor curriculum (toy_icl_findings.md: it gives colour features a gradient early)."""
    rng = np.random.default_rng([_ANCHOR_SALT, 0])
    held_out = held_out_permutations()
    while (perm := tuple(int(i) for i in rng.permutation(len(COLOURS)))) in held_out:
        pass
    return perm


def draw_pixels(colour: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: the colour everywhere plus Gaussian noise."""
    noisy = np.asarray(COLOURS[colour], np.float64) + rng.normal(0, NOISE_STD, (size, size, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def build_tokenizer():
    """Byte-level BPE trained on the prompt template and the answer words, so each " word" is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from stages.models.tiny import SPECIAL_TOKENS
    corpus = f"{VQA_INSTRUCTION}Image: Question: {QUESTION} Answer: " + " ".join(WORDS) + "\n"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 50, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left", extra_special_tokens=["<image>", "<fake_token_around_image>", "<end_of_utterance>"])
    for w in WORDS:
        assert len(fast(f" {w}", add_special_tokens=False)["input_ids"]) == 1, f"' {w}' is not one token"
    return fast


def build_model(seed: int = 0):
    """A ~1.6M-parameter Idefics2 (toy_icl_findings.md, "Exact setup") and its processor, random-initialised."""
    import torch
    from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil,
                              Idefics2Processor)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    n_latents = 4
    config = Idefics2Config(
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=4),
        perceiver_config=dict(hidden_size=128, rms_norm_eps=1e-5, resampler_n_latents=n_latents, resampler_depth=1,
                              resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=4),
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                         rms_norm_eps=1e-5, sliding_window=None))
    model = Idefics2ForConditionalGeneration(config)
    # Latents initialised to ones make every image the same vector (toy_icl_findings.md, pitfall 1).
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_(0, 0.02)
    model.set_attn_implementation("sdpa")
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=False,
                                                size={"longest_edge": IMAGE_SIZE, "shortest_edge": IMAGE_SIZE})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=n_latents)
    return model, processor


def write_toy_icl(root: str, permutation_seed: int, *, n_train: int = DEFAULT_N_TRAIN, n_val: int = 256, seed: int = 0) -> None:
    """Write held-out task `permutation_seed` as a VQAv2 data set; a no-op when the same set is complete there.

    Colours are balanced in each split (i % 8, shuffled). All 10 annotators give the task's word.
    """
    if not 0 <= permutation_seed < N_HELD_OUT:
        raise UserError(f"permutation seed {permutation_seed} is not held out from pretraining; "
                        f"choose 0..{N_HELD_OUT - 1}")
    perm = permutation(permutation_seed)
    params = {"format_version": FORMAT_VERSION, "permutation_seed": permutation_seed, "n_train": n_train,
              "n_val": n_val, "seed": seed, "mapping": {str(COLOURS[c]): WORDS[perm[c]] for c in range(len(COLOURS))}}

    def split_items(rng: np.random.Generator, n: int):
        for c in rng.permutation(np.arange(n) % len(COLOURS)):
            yield partial(draw_pixels, int(c)), WORDS[perm[int(c)]]

    write_vqa_set(root, params, MARKER, f"Toy ICL task {permutation_seed}",
                  f"toy ICL set (permutation {permutation_seed}, seed {seed})", np.random.default_rng([_PERM_SALT, 1, permutation_seed, seed]), split_items)


def write_vqa_set(root: str, params: dict, marker: str, name: str, what: str, rng: np.random.Generator,
                  split_items) -> None:
    """Write a toy data set in the official VQAv2 layout; a no-op when the same set (params) is complete there.

    split_items(rng, n) yields n (draw, answer word) per split, draw(rng) the image's pixels; all 10
    annotators give the word. name goes into the files' info, what into the error for another set. Written
    into a temporary sibling renamed at the end, so no half-written set ever looks complete; the marker
    file (params) is written last.
    """
    if params["n_train"] < 1 or params["n_val"] < 1:
        raise UserError(f"toy data needs n_train >= 1 and n_val >= 1; got {params['n_train']}, {params['n_val']}")
    root = os.path.abspath(root)
    if os.path.isdir(root) and os.listdir(root):
        marker_fpath = os.path.join(root, marker)
        if os.path.isfile(marker_fpath) and json.load(open(marker_fpath)) == params:
            return
        raise UserError(f"{root} exists and is not this {what}; remove it or choose another path")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp_dpath = f"{os.path.dirname(root)}/.{os.path.basename(root)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp_dpath)
    try:
        _write_splits(tmp_dpath, params, name, rng, split_items)
        with open(os.path.join(tmp_dpath, marker), "w") as f:
            json.dump(params, f)  # last: its presence means complete
        if os.path.isdir(root):
            os.rmdir(root)  # an empty directory the caller made
        os.rename(tmp_dpath, root)
    except BaseException:
        shutil.rmtree(tmp_dpath, ignore_errors=True)
        raise


def _write_splits(dpath: str, params: dict, name: str, rng: np.random.Generator, split_items) -> None:
    image_id = 1
    for split, n in (("train", params["n_train"]), ("val", params["n_val"])):
        os.mkdir(os.path.join(dpath, f"{split}2014"))
        questions, annotations = [], []
        for draw, word in split_items(rng, n):
            image_id += int(rng.integers(1, 8))  # sparse ids, like COCO's
            with open(os.path.join(dpath, f"{split}2014", f"COCO_{split}2014_{image_id:012d}.jpg"), "wb") as f:
                f.write(jpeg(draw(rng)))
            qid = image_id * 1000
            questions.append({"image_id": image_id, "question": QUESTION, "question_id": qid})
            annotations.append({"question_type": "what is", "multiple_choice_answer": word,
                                "answers": [{"answer": word, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i in range(10)],
                                "image_id": image_id, "answer_type": "other", "question_id": qid})
        info = {"description": f"{name} in the VQA format (MimIC pipeline)"}
        with open(os.path.join(dpath, f"v2_OpenEnded_mscoco_{split}2014_questions.json"), "w") as f:
            json.dump({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                       "data_subtype": f"{split}2014", "questions": questions}, f)
        with open(os.path.join(dpath, f"v2_mscoco_{split}2014_annotations.json"), "w") as f:
            json.dump({"info": info, "data_type": "mscoco", "data_subtype": f"{split}2014",
                       "annotations": annotations}, f)
