"""MMMU-Pro, standard setting with ten options, as Hugging Face `datasets` data (save_to_disk or parquet).

Where the data root may point (hf.py reads each form):
    the hub repo MMMU/MMMU_Pro, downloaded    its "standard (10 options)/test-*.parquet" are read
    that folder itself, or one parquet file
    a save_to_disk of load_dataset("MMMU/MMMU_Pro", "standard (10 options)", split="test") (or its DatasetDict)
Columns: id, question, options (a Python list written as a string, as on the hub, or a list), answer (a letter),
image_1 .. image_7, subject. Only questions with one image (image_1 alone) are taken, since a query holds one
image; the others are left out. MMMU-Pro has no training split: pools.py splits it (task.num_queries).
"""
from __future__ import annotations

import ast
import os
import string

from stages.errors import UserError
from stages.tasks.hf import _image, _read_table
from stages.tasks.sample import Sample

CONFIG_DIR = "standard (10 options)"
IMAGE_COLUMNS = tuple(f"image_{i}" for i in range(1, 8))
LETTERS = string.ascii_uppercase[:10]


def load_mmmu_pro(root: str, split: str = "test") -> list[Sample]:
    """The single-image questions in stored order; answers = (the right letter,), category = the subject."""
    if split != "test":
        raise UserError(f"mmmu-pro has only its test set, not split {split!r}")
    path = os.path.join(root, CONFIG_DIR) if os.path.isdir(os.path.join(root, CONFIG_DIR)) else root
    table, where = _read_table(path, "test")
    cols = table.column_names
    missing = [c for c in ("id", "question", "options", "answer", "image_1") if c not in cols]
    if missing:
        raise UserError(f"{where} lacks column(s): {', '.join(missing)} (it has: {', '.join(cols)}); "
                        "is it MMMU-Pro's standard (10 options) set?")
    rows = table.select([c for c in ("id", "question", "options", "answer", "subject", *IMAGE_COLUMNS) if c in cols])
    base_dpath = where if os.path.isdir(where) else os.path.dirname(where)
    samples, seen = [], set()
    for row in rows.to_pylist():
        sid = str(row["id"])
        if row["id"] is None or sid in seen:
            raise UserError(f"{where}: {'missing' if row['id'] is None else 'duplicate'} id {sid}")
        seen.add(sid)
        if sum(row.get(c) is not None for c in IMAGE_COLUMNS) != 1 or row["image_1"] is None:
            continue  # several images (or none in image_1): a query holds exactly one
        options = _options(row["options"], where, sid)
        if row["answer"] not in LETTERS[: len(options)]:
            raise UserError(f"{where}: id {sid} has answer {row['answer']!r}, expected a letter among its "
                            f"{len(options)} options (A-{LETTERS[len(options) - 1]})")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise UserError(f"{where}: id {sid} has an empty question")
        samples.append(Sample(id=sid, image=_image(row["image_1"], base_dpath, where, sid),
                              question=row["question"].strip(), answers=(row["answer"],), options=options,
                              category=str(row.get("subject") or "")))
    if not samples:
        raise UserError(f"{where} holds no single-image question")
    return samples


def _options(value, where: str, sid: str) -> tuple[str, ...]:
    """The option texts: the hub stores the list as its Python repr ("['1', '2']")."""
    try:
        options = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS):
        raise UserError(f"{where}: id {sid} has options {str(value)[:80]!r}; expected a list of 2 to 10 options")
    return tuple(str(o).strip() for o in options)
