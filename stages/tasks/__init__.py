"""The tasks: how to load each data set and how generation for it stops (METHOD.md §6).

A task name picks a TaskSpec from TASKS. HF `datasets` data comes as two tasks, hf-vqa and hf-caption,
because the kind decides the prompts, the stop words, the token budget and the metric before any data
is read; each refuses data of the other kind (a 'question' column, or none) with a hint to the right name.

MME, SEED-Bench and MMMU-Pro publish one labelled set and no training split: `split_by` says so, and
pools.py splits the set by a seeded shuffle (by image for MME, whose acc+ needs both questions of an image).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

from stages.errors import UserError
from stages.tasks.coco import load_coco_captions
from stages.tasks.flickr30k import load_flickr30k
from stages.tasks.hf import load_hf_caption, load_hf_vqa
from stages.tasks.mme import load_mme
from stages.tasks.mmmu_pro import load_mmmu_pro
from stages.tasks.sample import Sample
from stages.tasks.seed_bench import load_seed_bench
from stages.tasks.vqa import load_vqa

# "\n" from the authors' code, the rest from seed Tab. 6: generation is cut at the first of these.
VQA_STOP_WORDS = ("\n", "Question", "Answer", "Image")
CAPTION_STOP_WORDS = ("\n", "Caption", "Image")


@dataclass(frozen=True)
class TaskSpec:
    """name: the task's name in configs; kind: "vqa" (accuracy), "caption" (CIDEr), "yesno" (MME score)
    or "choice" (multiple-choice accuracy); load(root, split): the samples of a split under a data root;
    stop_words: cut generation at the first; max_new_tokens: generation budget in tokens;
    split_by: "" when the data has its own splits, else "question" or "image": the unit a seeded shuffle of
    its one labelled set (load(root, "test")) splits into training and evaluation queries."""

    name: str
    kind: Literal["vqa", "caption", "yesno", "choice"]
    load: Callable[[str, str], list[Sample]]
    stop_words: tuple[str, ...]
    max_new_tokens: int
    split_by: Literal["", "question", "image"] = ""


def _vqa(name: str, load: Callable[[str, str], list[Sample]]) -> TaskSpec:
    return TaskSpec(name, "vqa", load, VQA_STOP_WORDS, 10)


def _caption(name: str, load: Callable[[str, str], list[Sample]]) -> TaskSpec:
    return TaskSpec(name, "caption", load, CAPTION_STOP_WORDS, 20)


TASKS: dict[str, TaskSpec] = {
    "vqav2": _vqa("vqav2", partial(load_vqa, flavour="vqav2")),
    "okvqa": _vqa("okvqa", partial(load_vqa, flavour="okvqa")),
    "coco": _caption("coco", load_coco_captions),
    "hf-vqa": _vqa("hf-vqa", load_hf_vqa),
    "hf-caption": _caption("hf-caption", load_hf_caption),
    "flickr30k": _caption("flickr30k", load_flickr30k),
    "mme": TaskSpec("mme", "yesno", load_mme, VQA_STOP_WORDS, 10, split_by="image"),
    "seed-bench": TaskSpec("seed-bench", "choice", load_seed_bench, VQA_STOP_WORDS, 10, split_by="question"),
    "mmmu-pro": TaskSpec("mmmu-pro", "choice", load_mmmu_pro, VQA_STOP_WORDS, 10, split_by="question"),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
