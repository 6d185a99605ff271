"""SEED-Bench-2 from its release: `SEED-Bench_v2_level1_2_3.json` and the two image folders.

The authors' public code has no SEED-Bench loader, so this reads the release the seed describes (SEED-Bench-2:
24K questions, 27 dimensions). Layout under the data root (the Hugging Face repo AILab-CVC/SEED-Bench-2, unzipped):
    SEED-Bench_v2_level1_2_3.json   questions[*]: question_id, question, choice_a..choice_d, answer (A-D),
                                    data_type, data_source, data_id, question_type_id
    cc3m-image/{data_id}            images of data_source "cc3m" (cc3m-image.zip)
    SEED-Bench-2-image/{data_id}    images of data_source "SEED-Bench v2" (SEED-Bench-2-image.zip.*)
Only "Single Image" questions are taken (dimensions 1-16), since a query holds one image; this leaves out
dimensions 17-18 (Multiple Images), 19-22 (Video), 23-24 (Interleaved Image), 25-26 (Image Generation)
and 27 (Image & Text Generation). SEED-Bench has no training split: pools.py splits it (task.num_queries).
"""
from __future__ import annotations

import os

from stages.errors import UserError
from stages.tasks.jsonfile import read_json
from stages.tasks.sample import Sample

QA_FILE = "SEED-Bench_v2_level1_2_3.json"
IMAGE_DIRS = {"cc3m": "cc3m-image", "SEED-Bench v2": "SEED-Bench-2-image"}
CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")
NEEDED = ("question_id", "question", "answer", "data_source", "data_id", *CHOICE_KEYS)


def load_seed_bench(root: str, split: str = "test") -> list[Sample]:
    """The single-image questions in file order; answers = (the right letter,), category = the dimension's name."""
    if split != "test":
        raise UserError(f"seed-bench has only its test set, not split {split!r}")
    fpath = os.path.join(root, QA_FILE)
    data = _read(fpath)
    dimensions = {v: k for k, v in data.get("question_type", {}).items()}
    samples, seen = [], set()
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or "data_type" not in q:
            raise UserError(f"{fpath}: questions[{i}] has no 'data_type'")
        if q["data_type"] != "Single Image":
            continue
        missing = [k for k in NEEDED if k not in q]
        if missing:
            raise UserError(f"{fpath}: questions[{i}] lacks {', '.join(missing)}")
        qid = str(q["question_id"])
        if qid in seen:
            raise UserError(f"{fpath}: duplicate question_id {qid}")
        seen.add(qid)
        if q["answer"] not in ("A", "B", "C", "D"):
            raise UserError(f"{fpath}: question {qid} has answer {q['answer']!r}, expected one of A, B, C, D")
        if q["data_source"] not in IMAGE_DIRS or not isinstance(q["data_id"], str):
            raise UserError(f"{fpath}: question {qid} has data_source {q['data_source']!r} / data_id {q['data_id']!r}; "
                            f"expected one of {', '.join(IMAGE_DIRS)} and one file name")
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise UserError(f"{fpath}: question {qid} is empty")
        image = os.path.join(root, IMAGE_DIRS[q["data_source"]], q["data_id"])
        samples.append(Sample(id=qid, image=image, question=q["question"].strip(), answers=(q["answer"],),
                              options=tuple(str(q[k]).strip() for k in CHOICE_KEYS),
                              category=dimensions.get(q.get("question_type_id"), str(q.get("question_type_id", "")))))
    if not samples:
        raise UserError(f"{fpath} holds no single-image question")
    return samples


def _read(fpath: str) -> dict:
    data = read_json(fpath, f"SEED-Bench-2 question file not found: expected {fpath} (from AILab-CVC/SEED-Bench-2)")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise UserError(f"{fpath} has no 'questions' list; is it {QA_FILE}?")
    return data
