"""VQAv2 and OK-VQA from their official files: a questions JSON, an annotations JSON and COCO image folders.

Layout under the data root (the official zips unpacked side by side):
    v2_OpenEnded_mscoco_{split}2014_questions.json  v2_mscoco_{split}2014_annotations.json   (VQAv2)
    OpenEnded_mscoco_{split}2014_questions.json     mscoco_{split}2014_annotations.json      (OK-VQA)
    {split}2014/COCO_{split}2014_{image_id:012d}.jpg                                          (COCO images)
"""
from __future__ import annotations

import os

from stages.errors import UserError
from stages.tasks.jsonfile import read_json
from stages.tasks.sample import Sample

# flavour -> (questions file, annotations file); {split} is "train" or "val".
FILES = {
    "vqav2": ("v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json"),
}
SPLITS = ("train", "val")  # the test splits publish no annotations, so they cannot be scored or used as ICDs


def load_vqa(root: str, split: str, flavour: str) -> list[Sample]:
    """Every question of `split`, in questions-file order, with its 10 annotator answers in file order.

    Images are not checked here: on COCO that would be one stat call per question. A missing image is
    reported by Sample.load_image when it is first needed.
    """
    if flavour not in FILES:
        raise UserError(f"unknown VQA flavour {flavour!r}; choose one of: {', '.join(FILES)}")
    if split not in SPLITS:
        raise UserError(f"{flavour} has no split {split!r}; choose one of: {', '.join(SPLITS)}")
    questions_fpath, annotations_fpath = (os.path.join(root, name.format(split=split)) for name in FILES[flavour])
    questions = _read_list(questions_fpath, "questions", flavour)
    answers_by_qid = _answers_by_question(annotations_fpath, _read_list(annotations_fpath, "annotations", flavour))

    samples, seen = [], set()
    for i, q in enumerate(questions):
        qid, image_id, text = (_field(q, key, questions_fpath, i) for key in ("question_id", "image_id", "question"))
        if qid in seen:
            raise UserError(f"{questions_fpath}: duplicate question_id {qid}")
        seen.add(qid)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{questions_fpath}: question {qid} is empty")
        if qid not in answers_by_qid:
            raise UserError(f"{questions_fpath}: question {qid} has no annotation in {annotations_fpath}")
        if not isinstance(image_id, int):
            raise UserError(f"{questions_fpath}: question {qid} has image_id {image_id!r}, expected an integer")
        image_fpath = os.path.join(root, f"{split}2014", f"COCO_{split}2014_{image_id:012d}.jpg")
        samples.append(Sample(id=str(qid), image=image_fpath, question=text.strip(), answers=answers_by_qid[qid]))
    return samples


def _read_list(fpath: str, key: str, flavour: str) -> list[dict]:
    """The list under `key` of an official JSON file, or a UserError saying which file is expected where."""
    data = read_json(fpath, f"{flavour} {key} file not found: expected {fpath} (the official file, unzipped in the data root)")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UserError(f"{fpath} has no '{key}' list; is it the official {flavour} {key} file?")
    return data[key]


def _answers_by_question(fpath: str, annotations: list[dict]) -> dict[int, tuple[str, ...]]:
    """question_id -> the annotators' answers, in file order."""
    out = {}
    for i, ann in enumerate(annotations):
        qid = _field(ann, "question_id", fpath, i)
        if qid in out:
            raise UserError(f"{fpath}: duplicate annotation for question {qid}")
        answers = ann.get("answers") if isinstance(ann, dict) else None
        if not answers or not isinstance(answers, list):
            raise UserError(f"{fpath}: annotation of question {qid} has no answers")
        if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise UserError(f"{fpath}: annotation of question {qid} has an answer without an 'answer' string")
        out[qid] = tuple(a["answer"] for a in answers)
    return out


def _field(entry: dict, key: str, fpath: str, index: int):
    if not isinstance(entry, dict) or key not in entry:
        raise UserError(f"{fpath}: entry {index} has no '{key}'")
    return entry[key]
