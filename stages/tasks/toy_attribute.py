"""A second toy meta-task family, where the demonstrations say *which task*, not a per-query answer (issue 15).

Each image shows one square on a noisy grey background, and so three attributes at once: the square's
colour (8 values), its size (small or large) and the background's shade (dark or light). A task is one
attribute; the answer names that attribute's value ("red", "large", "light"). The question is "What is
it?" for every task, as in the lookup family (stages/tasks/toy_icl.py), so a zero-shot prompt is
ambiguous among the three tasks and only the demonstrations resolve it. What they add is the same for
every query of a task, the query-independent shift that MimIC, LIVE and task vectors assume of real
models; on the lookup family they add a per-query lookup instead, which a query-only student cannot match.

With three tasks none is held out from pretraining (scripts/train_toy_icl.py, --attr-frac): query and
demonstration images are, as every image is drawn fresh. Position (left/right, top/bottom) was tried
first and dropped: the toy model's image features do not carry it (a linear probe on the perceiver's
output reads the side at chance, colour, size and shade at 95-100 %), and 1,000 steps of training did
not teach it. `write_toy_attribute` writes one task as a data
set the normal pipeline reads (`task.name=vqav2`), in the layout of toy_icl.py's sets, with the marker
toy_attribute.json.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import partial

import numpy as np

from stages.errors import UserError
from stages.tasks.toy_icl import COLOURS, IMAGE_SIZE, NOISE_STD, write_vqa_set

MARKER = "toy_attribute.json"
FORMAT_VERSION = 1
# Every attribute's values, in the order of its index; colours in toy_icl.COLOURS' order.
ATTRIBUTES = {
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white"),
    "size": ("small", "large"),
    "background": ("dark", "light"),
}
TASKS = tuple(ATTRIBUTES)  # task t asks for attribute TASKS[t]
ANSWER_WORDS = tuple(w for values in ATTRIBUTES.values() for w in values)
SQUARE_PX = (4, 8)  # side of a small and of a large square
BACKGROUND = ((20, 70), (150, 200))  # grey levels of a dark and of a light background
_SALT = 0xA77


def draw_object(values: tuple[int, int, int], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: a square of (colour, size) anywhere on a (background) grey, plus noise."""
    colour, big, light = values
    lo, hi = BACKGROUND[light]
    pixels = np.full((size, size, 3), float(rng.integers(lo, hi + 1)))
    px = SQUARE_PX[big]
    y, x = (int(rng.integers(0, size - px + 1)) for _ in range(2))
    pixels[y:y + px, x:x + px] = COLOURS[colour]
    pixels += rng.normal(0, NOISE_STD, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def random_values(rng: np.random.Generator, task: int, value: int) -> tuple[int, ...]:
    """Attribute values of an image whose task attribute is `value` and every other attribute uniform."""
    values = [int(rng.integers(0, len(v))) for v in ATTRIBUTES.values()]
    values[task] = value
    return tuple(values)


def answer(task: int, values: tuple[int, ...]) -> str:
    return ATTRIBUTES[TASKS[task]][values[task]]


def task_index(task: int | str) -> int:
    if isinstance(task, str) and task in TASKS:
        return TASKS.index(task)
    if isinstance(task, int) and 0 <= task < len(TASKS):
        return task
    raise UserError(f"unknown attribute task {task!r}; choose one of {', '.join(TASKS)} (or 0..{len(TASKS) - 1})")


def write_toy_attribute(root: str, task: int | str, *, n_train: int = 256, n_val: int = 256, seed: int = 0) -> None:
    """Write task `task` (an attribute, or its index) as a VQAv2 data set; a no-op when the same set is complete.

    The asked attribute's values are balanced in each split (i % values, shuffled); the others are uniform.
    """
    t = task_index(task)
    params = {"format_version": FORMAT_VERSION, "task": TASKS[t], "n_train": n_train, "n_val": n_val, "seed": seed,
              "answers": list(ATTRIBUTES[TASKS[t]])}

    def split_items(rng: np.random.Generator, n: int):
        for value in rng.permutation(np.arange(n) % len(ATTRIBUTES[TASKS[t]])):
            values = random_values(rng, t, int(value))
            yield partial(draw_object, values), answer(t, values)

    write_vqa_set(root, params, MARKER, f"Toy attribute task '{TASKS[t]}'",
                  f"toy attribute set (task {TASKS[t]}, seed {seed})", np.random.default_rng([_SALT, t, seed]), split_items)


def extend_tokenizer(tokenizer):
    """The tokenizer with every " word" of ANSWER_WORDS one token, and every other text tokenized as before.

    The lookup family's byte-level BPE (toy_icl.build_tokenizer) splits these words into pieces. Each
    word's pieces are joined by merges appended after the existing ones (lowest priority), each a new
    token with the next free id; the model's embeddings are then resized to len(tokenizer). A no-op on a
    tokenizer that has them already.
    """
    from transformers import AutoTokenizer

    def pieces(tok, text):
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])

    if all(len(pieces(tokenizer, f" {w}")) == 1 for w in ANSWER_WORDS):
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        fpath = os.path.join(tmp, "tokenizer.json")
        state = json.load(open(fpath))
        vocab, merges = state["model"]["vocab"], state["model"]["merges"]
        next_id = max([*vocab.values(), *(t["id"] for t in state["added_tokens"])]) + 1
        extended = tokenizer
        for word in ANSWER_WORDS:
            parts = pieces(extended, f" {word}")
            while len(parts) > 1:
                merges.append([parts[0], parts[1]])
                parts = [parts[0] + parts[1], *parts[2:]]
                if parts[0] not in vocab:
                    vocab[parts[0]] = next_id
                    next_id += 1
            with open(fpath, "w") as f:
                json.dump(state, f)
            extended = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)  # our own files
    probe = "Instruction: provide an answer to the question. Use the image to answer.\nImage: Question: " \
            "What is it? Answer: apple river stone cloud tiger piano lemon rocket\n"
    assert extended(probe)["input_ids"] == tokenizer(probe)["input_ids"], "extending the tokenizer changed old text"
    for word in ANSWER_WORDS:
        assert len(pieces(extended, f" {word}")) == 1, word
    return extended
