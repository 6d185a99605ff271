"""MME from its official release folder (MME_Benchmark_release_version): 14 subtasks, two yes/no questions per image.

Layout under the data root (the folder holding the subtask folders; an inner MME_Benchmark/ is found too):
    {subtask}/images/{stem}.jpg|png + {subtask}/questions_answers_YN/{stem}.txt   artwork, celebrity, landmark,
                                                                                   posters, scene
    {subtask}/{stem}.jpg|png + {subtask}/{stem}.txt                                the other nine
Each .txt line is "question<TAB>Yes" or "question<TAB>No". MME has no training split: pools.py splits it by image
(task.num_queries questions, whole images, train; the rest are evaluated).
"""
from __future__ import annotations

import os

from stages.errors import UserError
from stages.tasks.sample import Sample

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
SPLIT_LAYOUT = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def load_mme(root: str, split: str = "test") -> list[Sample]:
    """Every question of every subtask, subtasks in the official order, images by file name, lines in file order.

    id = "{subtask}/{stem}/{line}"; answers = ("Yes",) or ("No",); category = the subtask.
    """
    if split != "test":
        raise UserError(f"mme has only its test set, not split {split!r}")
    root = _release_dir(root)
    samples = []
    for subtask in SUBTASKS:
        qa_dpath, image_dpath = _subtask_dirs(root, subtask)
        for name in sorted(n for n in os.listdir(qa_dpath) if n.endswith(".txt")):
            stem = name[: -len(".txt")]
            image = _image(image_dpath, stem, os.path.join(qa_dpath, name))
            for line_no, (question, answer) in enumerate(_read_pairs(os.path.join(qa_dpath, name))):
                samples.append(Sample(id=f"{subtask}/{stem}/{line_no}", image=image, question=question,
                                      answers=(answer,), category=subtask))
    return samples


def _release_dir(root: str) -> str:
    if not os.path.isdir(os.path.join(root, SUBTASKS[0])) and os.path.isdir(os.path.join(root, "MME_Benchmark")):
        return os.path.join(root, "MME_Benchmark")
    return root


def _subtask_dirs(root: str, subtask: str) -> tuple[str, str]:
    """(folder of the question files, folder of the images) of one subtask."""
    dpath = os.path.join(root, subtask)
    if not os.path.isdir(dpath):
        raise UserError(f"MME subtask folder not found: expected {dpath} (the official MME_Benchmark_release_version, "
                        f"with all 14 subtasks: {', '.join(SUBTASKS)})")
    if subtask not in SPLIT_LAYOUT:
        return dpath, dpath
    qa_dpath = os.path.join(dpath, "questions_answers_YN")
    if not os.path.isdir(qa_dpath):
        raise UserError(f"MME subtask {subtask} has no questions_answers_YN folder: expected {qa_dpath}")
    return qa_dpath, os.path.join(dpath, "images")


def _image(image_dpath: str, stem: str, qa_fpath: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(fpath := os.path.join(image_dpath, stem + ext)):
            return fpath
    raise UserError(f"{qa_fpath}: no image {stem}.jpg or {stem}.png in {image_dpath}")


def _read_pairs(fpath: str) -> list[tuple[str, str]]:
    """(question, "Yes" | "No") per non-blank line."""
    try:
        with open(fpath, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{fpath} is not UTF-8 text: {e}") from None
    pairs = []
    for i, line in enumerate(lines):
        question, _, answer = line.rpartition("\t")
        if not question.strip() or answer.strip() not in ("Yes", "No"):
            raise UserError(f"{fpath}: line {i + 1} is not 'question<TAB>Yes' or 'question<TAB>No': {line[:80]!r}")
        pairs.append((question.strip(), answer.strip()))
    if not pairs:
        raise UserError(f"{fpath} holds no question")
    return pairs
