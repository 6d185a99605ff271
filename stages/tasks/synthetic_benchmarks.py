"""The synthetic scenes in the layouts of the tasks with a Tab. 10 result (part of `pipeline make-data`).

Under the synthetic data set's root, one folder per task, each its task.root:
    flickr30k/    dataset_flickr30k.json (Karpathy: train + restval scenes as train, val, test), flickr30k-images/
    mme/          the 14 subtask folders of the MME release, two yes/no questions per image (one Yes, one No);
                  artwork, celebrity, landmark, posters, scene with images/ + questions_answers_YN/
    seed_bench/   SEED-Bench_v2_level1_2_3.json, cc3m-image/, SEED-Bench-2-image/: one single-image question
                  per scene (A-D), and for every 8th scene a "Multiple Images" and a "Video" question (left out)
    mmmu_pro/     "standard (10 options)"/test-00000-of-00001.parquet, the hub layout: one ten-option question
                  per scene, every 8th with a second image (left out)
Every scene of the set (train, val, restval, test) appears once in each; the questions ask its colour, shape
or count, so their answers follow from the image.
"""
from __future__ import annotations

import json
import os

import numpy as np

from stages.tasks.mme import SPLIT_LAYOUT, SUBTASKS

EXTRA_COLOURS = ("black", "brown")  # with the 8 scene colours, ten options for MMMU-Pro
SEED_DIMENSIONS = {"Instance Identity": 2, "Instance Attributes": 3, "Instances Counting": 5,
                   "Difference Spotting": 17, "Global Video Understanding": 19}
LEFT_OUT_EVERY = 8  # every 8th scene also gets a question with several images, which the loaders leave out


def write_benchmarks(dpath: str, scenes: list, jpeg_by_id: dict[int, bytes], captions: dict[int, list[str]],
                     colours: tuple[str, ...], shapes: tuple[str, ...], rng: np.random.Generator) -> None:
    _flickr30k(os.path.join(dpath, "flickr30k"), scenes, jpeg_by_id, captions)
    _mme(os.path.join(dpath, "mme"), scenes, jpeg_by_id, colours, rng)
    _seed_bench(os.path.join(dpath, "seed_bench"), scenes, jpeg_by_id, colours, shapes, rng)
    _mmmu_pro(os.path.join(dpath, "mmmu_pro"), scenes, jpeg_by_id, colours + EXTRA_COLOURS, rng)


def _write(fpath: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(fpath), exist_ok=True)
    with open(fpath, "wb") as f:
        f.write(data)


def _write_json(fpath: str, obj) -> None:
    _write(fpath, json.dumps(obj).encode())


def _flickr30k(dpath: str, scenes, jpeg_by_id, captions) -> None:
    split = {"train": "train", "restval": "train", "val": "val", "test": "test"}
    images = []
    for imgid, s in enumerate(scenes):
        _write(os.path.join(dpath, "flickr30k-images", f"{s.image_id}.jpg"), jpeg_by_id[s.image_id])
        sentences = [{"tokens": c.lower().rstrip(".").split(), "raw": c, "imgid": imgid, "sentid": 5 * imgid + k}
                     for k, c in enumerate(captions[s.image_id])]
        images.append({"sentids": [x["sentid"] for x in sentences], "imgid": imgid, "sentences": sentences,
                       "split": split[s.karpathy], "filename": f"{s.image_id}.jpg"})
    _write_json(os.path.join(dpath, "dataset_flickr30k.json"), {"images": images, "dataset": "flickr30k"})


def _mme(dpath: str, scenes, jpeg_by_id, colours, rng) -> None:
    for j, s in enumerate(scenes):
        subtask = SUBTASKS[j % len(SUBTASKS)]
        other = str(rng.choice([c for c in colours if c != s.colour]))
        lines = [f"Is there a {s.colour} shape in the image? Please answer yes or no.\tYes",
                 f"Is there a {other} shape in the image? Please answer yes or no.\tNo"]
        images, qas = (("images", "questions_answers_YN") if subtask in SPLIT_LAYOUT else ("", ""))
        _write(os.path.join(dpath, subtask, images, f"{s.image_id}.jpg"), jpeg_by_id[s.image_id])
        _write(os.path.join(dpath, subtask, qas, f"{s.image_id}.txt"), ("\n".join(lines) + "\n").encode())


def _lettered(answer: str, pool: tuple[str, ...], n: int, rng) -> tuple[list[str], str]:
    """n options, the answer among n - 1 others from pool at a random place; (options, the answer's letter)."""
    options = [answer] + [str(x) for x in rng.choice([p for p in pool if p != answer], n - 1, replace=False)]
    options = [options[i] for i in rng.permutation(n)]
    return options, "ABCDEFGHIJ"[options.index(answer)]


def _seed_bench(dpath: str, scenes, jpeg_by_id, colours, shapes, rng) -> None:
    questions = []
    for j, s in enumerate(scenes):
        template = j % 3
        if template == 0:
            text, answer, pool, dimension = "What color is the shape?", s.colour, colours, "Instance Attributes"
        elif template == 1:
            text, answer, pool, dimension = "What shape is shown?", s.shape, shapes + ("star",), "Instance Identity"
        else:
            text, answer, pool, dimension = ("How many shapes are in the image?", str(s.count), ("1", "2", "3", "4"),
                                             "Instances Counting")
        options, letter = _lettered(answer, pool, 4, rng)
        # Images of the first dimensions come from CC3M (data_id a bare file name), later ones from SEED-Bench-2.
        source, data_id = ("cc3m", f"{s.image_id}_{j}") if j % 2 else ("SEED-Bench v2", f"task9/{s.image_id}.jpg")
        _write(os.path.join(dpath, "cc3m-image" if source == "cc3m" else "SEED-Bench-2-image", data_id),
               jpeg_by_id[s.image_id])
        questions.append(_seed_question(f"{SEED_DIMENSIONS[dimension]}_{j}", text, options, letter, data_id, source,
                                        "Single Image", SEED_DIMENSIONS[dimension]))
        if j % LEFT_OUT_EVERY == 0:
            frames = [f"task19/frames/{s.image_id}/{k}.png" for k in range(1, 4)]
            questions.append(_seed_question(f"17_{j}", "What differs between the two images?", options, letter,
                                            [data_id, data_id], source, "Multiple Images", 17))
            questions.append(_seed_question(f"19_{j}", "What happens in the video?", options, letter, frames,
                                            "SEED-Bench v2", "Video", 19))
    _write_json(os.path.join(dpath, "SEED-Bench_v2_level1_2_3.json"),
                {"questions": questions, "question_type": SEED_DIMENSIONS})


def _seed_question(qid, text, options, letter, data_id, source, data_type, dimension) -> dict:
    subparts = {"Single Image": "Single-Image & Text Comprehension", "Multiple Images": "Multiple-Images & Text "
                "Comprehension", "Video": "Video & Text Comprehension"}
    return {"answer": letter, **{f"choice_{c}": o for c, o in zip("abcd", options)}, "data_id": data_id,
            "data_source": source, "data_type": data_type, "level": "L1", "question": text, "question_id": qid,
            "question_type_id": dimension, "subpart": subparts[data_type], "version": "v1" if dimension < 10 else "v2"}


def _mmmu_pro(dpath: str, scenes, jpeg_by_id, colours, rng) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    subjects = ("Art", "Physics", "Design")
    rows = {k: [] for k in ("id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty",
                            "subject", *(f"image_{i}" for i in range(1, 8)))}
    for j, s in enumerate(scenes):
        options, letter = _lettered(s.colour, colours, 10, rng)
        subject = subjects[j % len(subjects)]
        image = {"bytes": jpeg_by_id[s.image_id], "path": f"{s.image_id}.jpg"}
        for key, value in (("id", f"test_{subject}_{j}"), ("question", "What color is the shape in <image 1>?"),
                           ("options", repr(options)), ("explanation", ""), ("img_type", "['Diagrams']"),
                           ("answer", letter), ("topic_difficulty", "Easy"), ("subject", subject), ("image_1", image),
                           ("image_2", image if j % LEFT_OUT_EVERY == 0 else None)):
            rows[key].append(value)
        for i in range(3, 8):
            rows[f"image_{i}"].append(None)
    table = pa.table({k: pa.array(v, type=image_type if k.startswith("image_") else pa.string())
                      for k, v in rows.items()})
    os.makedirs(os.path.join(dpath, "standard (10 options)"))
    pq.write_table(table, os.path.join(dpath, "standard (10 options)", "test-00000-of-00001.parquet"))
