"""A data set in Hugging Face `datasets` form: a `save_to_disk` directory or parquet file(s).

Columns:
    image                       datasets Image feature (struct of encoded bytes and/or path), raw bytes, or a path
    question                    optional; without it the data set is captioning
    answers | captions          list of str (a list of {"answer": str}, the hub's VQAv2 form, works too)
    question_id | id | image_id the sample id, the first of these present
The encoded image bytes are kept as they are (never decoded here, like Image(decode=False)); a relative
path is taken relative to the data set's directory.

Which rows `split` selects, first rule that applies (`path` may name any of these):
    a save_to_disk DatasetDict              its split `split`
    a directory with a `split` entry        path/{split}/ or path/{split}.parquet, read by these rules
    hub-named parquet files                 path/{split}-00000-of-00002.parquet, ... (also under path/data/)
    one save_to_disk Dataset, a .parquet file, or a directory of parquet files: the data set is one
    split and is used as it is, whatever `split` says.
"val" and "validation" name the same split, so the VQA and caption tasks' "val" works on HF data.
"""
from __future__ import annotations

import glob
import os
import re

from typing import TYPE_CHECKING

from stages.errors import UserError
from stages.tasks.sample import Sample

if TYPE_CHECKING:
    import pyarrow as pa

ID_COLUMNS = ("question_id", "id", "image_id")
_HUB_PARQUET = re.compile(r"^(\w+?)-\d+-of-\d+\.parquet$")


def load_hf(path: str, split: str) -> list[Sample]:
    """The rows of `split` as Samples, in stored order (see the module docstring for how `split` is found)."""
    table, where = _read_table(path, split)
    return _to_samples(table, where)


def load_hf_vqa(path: str, split: str) -> list[Sample]:
    """load_hf for task hf-vqa: the data must have a question column."""
    samples = load_hf(path, split)
    if samples[0].question is None:
        raise UserError(f"{path} has no 'question' column, so it is captioning data: use task hf-caption")
    return samples


def load_hf_caption(path: str, split: str) -> list[Sample]:
    """load_hf for task hf-caption: the data must not have a question column."""
    samples = load_hf(path, split)
    if samples[0].question is not None:
        raise UserError(f"{path} has a 'question' column, so it is VQA data: use task hf-vqa")
    return samples


def _split_names(split: str) -> tuple[str, ...]:
    return {"val": ("val", "validation"), "validation": ("validation", "val")}.get(split, (split,))


def _read_table(path: str, split: str) -> tuple[pa.Table, str]:
    """(the rows of `split`, the file or directory they came from, for messages)."""
    if not os.path.exists(path):
        raise UserError(f"HF data set not found: {path} (expected a save_to_disk directory or parquet file(s))")
    if os.path.isfile(path):
        return _read_parquet([path]), path
    names = _split_names(split)
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        dd = _load_from_disk(path)
        name = next((n for n in names if n in dd), None)
        if name is None:
            raise UserError(f"{path} has no split {split!r}; it has: {', '.join(dd)}")
        return dd[name].with_format("arrow")[:], os.path.join(path, name)
    if os.path.isfile(os.path.join(path, "state.json")):
        return _load_from_disk(path).with_format("arrow")[:], path
    for name in names:
        for candidate in (os.path.join(path, name), os.path.join(path, f"{name}.parquet")):
            if os.path.exists(candidate):
                return _read_table(candidate, split)
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not files and os.path.isdir(os.path.join(path, "data")):
        return _read_table(os.path.join(path, "data"), split)
    if not files:
        raise UserError(f"{path} holds neither a save_to_disk data set nor parquet files")
    hub_splits = {f: m.group(1) for f in files if (m := _HUB_PARQUET.match(os.path.basename(f)))}
    if hub_splits:
        files = [f for f, s in hub_splits.items() if s in names]
        if not files:
            found = ", ".join(sorted(set(hub_splits.values())))
            raise UserError(f"{path} has no parquet files of split {split!r}; it has: {found}")
    return _read_parquet(files), path


def _load_from_disk(dpath: str):
    import datasets  # here, not at the top: importing it costs ~0.8 s that the other tasks need not pay
    import pyarrow as pa

    try:
        return datasets.load_from_disk(dpath)
    except (FileNotFoundError, ValueError, pa.ArrowInvalid) as e:
        raise UserError(f"{dpath} is not a readable save_to_disk data set: {e}") from None


def _read_parquet(fpaths: list[str]) -> pa.Table:
    # pyarrow here, not at import: the stages load this module, and a GPU job carrying only what it
    # uses should not need pyarrow (BENCHMARKS.md, gpu.sh) unless it reads HF data.
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for fpath in fpaths:
        try:
            tables.append(pq.read_table(fpath))
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{fpath} is not a readable parquet file: {e}") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as e:
        raise UserError(f"parquet files under {os.path.dirname(fpaths[0])} have different columns: {e}") from None


def _to_samples(table: pa.Table, where: str) -> list[Sample]:
    cols = table.column_names
    refs_col = next((c for c in ("answers", "captions") if c in cols), None)
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    needed = {"image": "image" in cols, "answers or captions": refs_col, " or ".join(ID_COLUMNS): id_col}
    missing = [name for name, found in needed.items() if not found]
    if missing:
        raise UserError(f"{where} lacks column(s): {'; '.join(missing)} (it has: {', '.join(cols)})")
    if table.num_rows == 0:
        raise UserError(f"{where} has no rows")
    base_dpath = where if os.path.isdir(where) else os.path.dirname(where)
    ids, images, refs = (table.column(c).to_pylist() for c in (id_col, "image", refs_col))
    questions = table.column("question").to_pylist() if "question" in cols else [None] * table.num_rows

    samples, seen = [], set()
    for raw_id, image, question, ref in zip(ids, images, questions, refs):
        sid = str(raw_id)
        if raw_id is None or sid in seen:
            raise UserError(f"{where}: {'missing' if raw_id is None else 'duplicate'} {id_col} {sid}")
        seen.add(sid)
        if "question" in cols and (not isinstance(question, str) or not question.strip()):
            raise UserError(f"{where}: {id_col} {sid} has an empty question")
        answers = tuple(r.get("answer") if isinstance(r, dict) else r for r in ref or [])
        if not answers or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{where}: {id_col} {sid} has no {refs_col} (expected a list of strings)")
        image = _image(image, base_dpath, where, sid)
        samples.append(Sample(id=sid, image=image, question=question and question.strip(), answers=answers))
    return samples


def _image(value, base_dpath: str, where: str, sid: str) -> str | bytes:
    """Encoded bytes when stored, else the path (relative ones resolved against the data set's directory)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value:
        return value if os.path.isabs(value) else os.path.join(base_dpath, value)
    raise UserError(f"{where}: sample {sid} has no image (neither bytes nor a path)")
