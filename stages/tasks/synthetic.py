"""A small synthetic data set written in the official formats of every task, for the tests and the benchmarks.

One directory holds all formats:
    train2014/, val2014/      COCO_{split}2014_{image_id:012d}.jpg, 32x32 JPEG by default
    v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json    VQAv2
    OpenEnded_mscoco_{split}2014_questions.json, mscoco_{split}2014_annotations.json          OK-VQA
    dataset_coco.json         Karpathy captions, 5 per image
    hf/vqa/                   save_to_disk DatasetDict {train, validation}: the VQAv2 questions
    hf/captions/              save_to_disk DatasetDict {train, validation}: Karpathy train + restval, and val
    flickr30k/, mme/, seed_bench/, mmmu_pro/   the same scenes in those tasks' layouts (synthetic_benchmarks.py)
    synthetic.json            the parameters; the set is complete when this file exists

Each image shows 1-3 shapes of one kind (square, circle, triangle) and one of 8 named colours on a random
dark background with a little pixel noise, so no image is ever uniform (Idefics2 drops all-zero normalised
images as padding). train2014 holds n_train images, val2014 n_val images plus n_val // 4 "restval" and
n_val // 4 "test" images that only the Karpathy file uses (as in the real split, both come from val2014).
Each train/val image carries one VQAv2 and one OK-VQA question whose answer follows from the image; 7-10 of
the 10 VQAv2 annotators give it, the others a near miss (another colour, a synonym, a number word, an
off-by-one count), so VQA accuracy is neither 0 nor 100 for free. OK-VQA, as the real one, has 5 annotators
whose answers are each listed twice. Question ids (image_id * 1000 + 0 for VQAv2, image_id * 10 + 0 for
OK-VQA, the official schemes) are unique across splits because image ids are.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stages.errors import UserError
from stages.tasks.synthetic_benchmarks import write_benchmarks

MARKER = "synthetic.json"
FORMAT_VERSION = 2  # bump when the content changes, so an old cached set is refused instead of silently reused
DEFAULT_N_TRAIN = 64  # training samples of a set (`pipeline make-data`)

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "orange": (250, 140, 20), "purple": (160, 60, 210), "pink": (250, 130, 190), "white": (245, 245, 245)}
SHAPES = ("square", "circle", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# What disagreeing annotators say instead of the true answer.
NEAR_COLOURS = {"red": ["dark red", "orange", "maroon"], "green": ["lime", "dark green"], "blue": ["navy", "purple"],
                "yellow": ["gold", "orange"], "orange": ["red", "yellow"], "purple": ["violet", "blue"],
                "pink": ["magenta", "red"], "white": ["gray", "silver"]}
SHAPE_SYNONYMS = {"square": ["rectangle", "box"], "circle": ["ball", "oval"], "triangle": ["pyramid", "arrow"]}
# OK-VQA needs outside knowledge: a fruit of the colour, the sides of the shape, its 3D counterpart.
FRUITS = {"red": ("apple", ["strawberry", "cherry"]), "green": ("lime", ["apple", "kiwi"]),
          "blue": ("blueberry", ["plum"]), "yellow": ("banana", ["lemon"]), "orange": ("orange", ["tangerine"]),
          "purple": ("grape", ["plum", "eggplant"]), "pink": ("grapefruit", ["peach"]),
          "white": ("coconut", ["lychee"])}
SIDES = {"square": ("4", ["four", "2"]), "circle": ("0", ["none", "1"]), "triangle": ("3", ["three", "4"])}
SOLIDS = {"square": ("cube", ["box", "prism"]), "circle": ("sphere", ["ball", "globe"]),
          "triangle": ("pyramid", ["cone", "tetrahedron"])}


@dataclass(frozen=True)
class _Scene:
    image_id: int
    folder: str    # "train" or "val": the COCO folder, {folder}2014
    karpathy: str  # "train", "restval", "val" or "test"
    colour: str
    shape: str
    count: int

    @property
    def filename(self) -> str:
        return f"COCO_{self.folder}2014_{self.image_id:012d}.jpg"


def write_synthetic(root: str, *, n_train: int = DEFAULT_N_TRAIN, n_val: int = 32, seed: int = 0, image_size: int = 32) -> None:
    """Write the data set to `root`; a no-op when a complete one with the same parameters is there.

    Everything is written into a temporary sibling that is renamed to `root` at the end, so a crash or a
    concurrent writer never leaves a half-written set that looks complete. Deterministic for a seed: a
    rerun gives byte-identical files.
    """
    if n_train < 1 or n_val < 1 or image_size < 16:
        raise UserError(f"synthetic data needs n_train >= 1, n_val >= 1, image_size >= 16; got {n_train}, {n_val}, {image_size}")
    params = {"format_version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed,
              "image_size": image_size}
    root = os.path.abspath(root)
    if _is_complete(root, params):
        return
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp_dpath = f"{os.path.dirname(root)}/.{os.path.basename(root)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp_dpath)
    try:
        _write_all(tmp_dpath, params)
        os.rename(tmp_dpath, root)  # atomic; also replaces an empty directory the caller made beforehand
    except OSError:
        shutil.rmtree(tmp_dpath, ignore_errors=True)
        if _is_complete(root, params):  # a concurrent writer published first
            return
        raise
    except BaseException:
        shutil.rmtree(tmp_dpath, ignore_errors=True)
        raise


def _is_complete(root: str, params: dict) -> bool:
    """True when `root` holds a complete set made with `params`; refuses anything else that is not empty."""
    if not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root)):
        return False
    marker_fpath = os.path.join(root, MARKER)
    if not os.path.isfile(marker_fpath):
        raise UserError(f"{root} exists and is not a synthetic data set (no {MARKER}); remove it or choose another path")
    with open(marker_fpath) as f:
        found = json.load(f)
    if found != params:
        diff = ", ".join(f"{k}={found.get(k)} (asked {v})" for k, v in params.items() if found.get(k) != v)
        raise UserError(f"{root} holds a synthetic data set with other parameters: {diff}; remove it or choose another path")
    return True


def _write_all(dpath: str, params: dict) -> None:
    seed, size = params["seed"], params["image_size"]
    # One random stream per purpose, so changing e.g. a question template does not change the images.
    rng_scene, rng_pixels, rng_vqav2, rng_okvqa, rng_caption, rng_bench = (np.random.default_rng([seed, k])
                                                                          for k in range(6))
    scenes = _make_scenes(params["n_train"], params["n_val"], rng_scene)
    jpeg_by_id = {}
    for folder in ("train", "val"):
        os.mkdir(os.path.join(dpath, f"{folder}2014"))
    for s in scenes:
        jpeg_by_id[s.image_id] = _draw(s, size, rng_pixels)
        with open(os.path.join(dpath, f"{s.folder}2014", s.filename), "wb") as f:
            f.write(jpeg_by_id[s.image_id])

    vqa = {}  # folder -> VQAv2 questions, as written, for the HF copy
    for folder in ("train", "val"):
        split_scenes = [s for s in scenes if s.folder == folder and s.karpathy in ("train", "val")]
        vqa[folder] = [_vqav2_question(s, rng_vqav2) for s in split_scenes]
        _write_vqa_files(dpath, "v2_OpenEnded_mscoco_{}2014_questions.json", "v2_mscoco_{}2014_annotations.json",
                         folder, split_scenes, vqa[folder], qid_base=1000, n_annotators=10)
        okvqa = [_okvqa_question(s, rng_okvqa) for s in split_scenes]
        _write_vqa_files(dpath, "OpenEnded_mscoco_{}2014_questions.json", "mscoco_{}2014_annotations.json",
                         folder, split_scenes, okvqa, qid_base=10, n_annotators=5)
    captions = {s.image_id: _captions(s, rng_caption) for s in scenes}
    _write_json(os.path.join(dpath, "dataset_coco.json"), _karpathy(scenes, captions))
    _write_hf(os.path.join(dpath, "hf"), scenes, vqa, captions, jpeg_by_id)
    write_benchmarks(dpath, scenes, jpeg_by_id, captions, tuple(COLOURS), SHAPES, rng_bench)
    _write_json(os.path.join(dpath, MARKER), params)  # last: its presence means complete


def _make_scenes(n_train: int, n_val: int, rng: np.random.Generator) -> list[_Scene]:
    n_extra = n_val // 4
    layout = ([("train", "train")] * n_train + [("val", "val")] * n_val
              + [("val", "restval")] * n_extra + [("val", "test")] * n_extra)
    scenes = []
    for j, (folder, karpathy) in enumerate(layout):
        scenes.append(_Scene(image_id=9 + 7 * j, folder=folder, karpathy=karpathy,  # sparse ids, like COCO's
                             colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)),
                             count=int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))))
    return scenes


def _draw(s: _Scene, size: int, rng: np.random.Generator) -> bytes:
    """JPEG bytes: s.count shapes in distinct quadrants on a dark background, plus noise."""
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(10, 90, 3)))
    draw = ImageDraw.Draw(im)
    cell = size / 2
    for quadrant in rng.permutation(4)[: s.count]:
        cx, cy = (quadrant % 2 + 0.5) * cell, (quadrant // 2 + 0.5) * cell
        cx, cy = cx + rng.uniform(-0.1, 0.1) * cell, cy + rng.uniform(-0.1, 0.1) * cell
        r = rng.uniform(0.28, 0.4) * cell
        if s.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[s.colour])
        elif s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[s.colour])
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[s.colour])
    noisy = np.asarray(im, np.int16) + rng.integers(-8, 9, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _vqav2_question(s: _Scene, rng: np.random.Generator) -> dict:
    """question, question_type, answer_type, the true answer and the near misses annotators give."""
    many = s.count > 1
    template = int(rng.integers(4))
    if template == 0:
        q, qtype, atype, answer, misses = (f"What color {'are the shapes' if many else 'is the shape'}?",
                                           "what color is the", "other", s.colour, NEAR_COLOURS[s.colour])
    elif template == 1:
        q, qtype, atype, answer, misses = (f"What shape {'are they' if many else 'is it'}?",
                                           "what is the", "other", s.shape, SHAPE_SYNONYMS[s.shape])
    elif template == 2:
        # "two" for 2 is the same answer after the official normalisation: realistic disagreement in form only.
        misses = [NUMBER_WORDS[s.count], str(s.count + 1)] + ([str(s.count - 1)] if many else [])
        q, qtype, atype, answer = "How many shapes are there?", "how many", "number", str(s.count)
    else:
        asked = s.colour if rng.random() < 0.5 else str(rng.choice([c for c in COLOURS if c != s.colour]))
        answer = "yes" if asked == s.colour else "no"
        q, qtype, atype = f"Is there a {asked} shape?", "is there a", "yes/no"
        misses = ["no" if answer == "yes" else "yes"]
    n_agree = int(rng.choice([7, 8, 9, 10], p=[0.3, 0.35, 0.25, 0.1]))
    return {"question": q, "question_type": qtype, "answer_type": atype, "answer": answer,
            "answers": _annotate(answer, misses, n_agree, 10, rng)}


def _okvqa_question(s: _Scene, rng: np.random.Generator) -> dict:
    template = int(rng.integers(3))
    if template == 0:
        q, (answer, misses) = "What fruit is usually this color?", FRUITS[s.colour]
    elif template == 1:
        q, (answer, misses) = f"How many sides does {'each' if s.count > 1 else 'this'} shape have?", SIDES[s.shape]
    else:
        q, (answer, misses) = "What is the 3d version of this shape called?", SOLIDS[s.shape]
    n_agree = int(rng.choice([3, 4, 5], p=[0.3, 0.45, 0.25]))
    five = _annotate(answer, misses, n_agree, 5, rng)
    # Real OK-VQA lists each of its 5 annotators' answers twice, filling the 10 VQA answer slots.
    return {"question": q, "question_type": "other", "answer_type": "other", "answer": answer,
            "answers": [a for a in five for _ in range(2)]}


def _annotate(answer: str, misses: list[str], n_agree: int, n: int, rng: np.random.Generator) -> list[str]:
    """n annotator answers: n_agree give `answer`, the others a near miss; order shuffled."""
    answers = [answer] * n_agree + [str(rng.choice(misses)) for _ in range(n - n_agree)]
    return [answers[i] for i in rng.permutation(n)]


def _write_vqa_files(dpath: str, questions_name: str, annotations_name: str, folder: str,
                     scenes: list[_Scene], qas: list[dict], qid_base: int, n_annotators: int) -> None:
    """The official questions + annotations files; field names and order as in the VQAv2 release."""
    subtype = f"{folder}2014"
    info = {"description": "Synthetic data in the VQA format (MimIC pipeline)", "version": "2.0", "year": 2017,
            "contributor": "synthetic", "date_created": "2017-04-26 17:00:44"}
    license_ = {"url": "http://creativecommons.org/licenses/by/4.0/",
                "name": "Creative Commons Attribution 4.0 International License"}
    questions, annotations = [], []
    for s, qa in zip(scenes, qas):
        qid = s.image_id * qid_base
        questions.append({"image_id": s.image_id, "question": qa["question"], "question_id": qid})
        answers = [{"answer": a, "answer_confidence": "yes" if a == qa["answer"] else "maybe",
                    "answer_id": i + 1} for i, a in enumerate(qa["answers"])]
        annotations.append({"question_type": qa["question_type"], "multiple_choice_answer": qa["answer"],
                            "answers": answers, "image_id": s.image_id, "answer_type": qa["answer_type"],
                            "question_id": qid})
    _write_json(os.path.join(dpath, questions_name.format(folder)),
                {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": license_,
                 "data_subtype": subtype, "questions": questions})
    _write_json(os.path.join(dpath, annotations_name.format(folder)),
                {"info": info, "license": license_, "data_subtype": subtype, "annotations": annotations,
                 "data_type": "mscoco"})


def _captions(s: _Scene, rng: np.random.Generator) -> list[str]:
    """5 reference captions drawn from 6 phrasings."""
    word, noun = NUMBER_WORDS[s.count], s.shape + ("s" if s.count > 1 else "")
    some = word if s.count > 1 else ("an" if s.colour[0] in "aeiou" else "a")
    phrasings = [f"{some} {s.colour} {noun} on a dark background.",
                 f"{word} {s.colour} {noun} against a dark backdrop.",
                 f"There {'are' if s.count > 1 else 'is'} {word} {s.colour} {noun} in the picture.",
                 f"A simple drawing of {word} {s.colour} {noun}.",
                 f"{some} {noun} colored {s.colour} on a plain dark background.",
                 f"An image with {word} {s.colour} {noun}."]
    return [phrasings[i][0].upper() + phrasings[i][1:] for i in rng.permutation(len(phrasings))[:5]]


def _karpathy(scenes: list[_Scene], captions: dict[int, list[str]]) -> dict:
    images, sentid = [], 0
    for imgid, s in enumerate(scenes):
        sentences = []
        for raw in captions[s.image_id]:
            tokens = raw.lower().rstrip(".").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filepath": f"{s.folder}2014", "sentids": [x["sentid"] for x in sentences],
                       "filename": s.filename, "imgid": imgid, "split": s.karpathy, "sentences": sentences,
                       "cocoid": s.image_id})
    return {"images": images, "dataset": "coco"}


def _write_hf(dpath: str, scenes: list[_Scene], vqa: dict[str, list[dict]], captions: dict[int, list[str]],
              jpeg_by_id: dict[int, bytes]) -> None:
    """The same questions and captions as save_to_disk DatasetDicts; the images are the very JPEG bytes."""
    import datasets  # here, not at the top: importing it costs ~0.8 s that the JSON formats do not need
    from datasets import Dataset, DatasetDict, Features, List, Value

    def image(s: _Scene) -> dict:
        return {"bytes": jpeg_by_id[s.image_id], "path": s.filename}

    vqa_features = Features({"image": datasets.Image(), "question_id": Value("int64"), "image_id": Value("int64"),
                             "question": Value("string"), "answers": List(Value("string"))})
    caption_features = Features({"image": datasets.Image(), "image_id": Value("int64"),
                                 "captions": List(Value("string"))})
    vqa_splits, caption_splits = {}, {}
    for name, folder, karpathy in (("train", "train", ("train", "restval")), ("validation", "val", ("val",))):
        asked = [s for s in scenes if s.folder == folder and s.karpathy in ("train", "val")]
        vqa_splits[name] = Dataset.from_dict(
            {"image": [image(s) for s in asked], "question_id": [s.image_id * 1000 for s in asked],
             "image_id": [s.image_id for s in asked], "question": [qa["question"] for qa in vqa[folder]],
             "answers": [qa["answers"] for qa in vqa[folder]]}, features=vqa_features)
        captioned = [s for s in scenes if s.karpathy in karpathy]
        caption_splits[name] = Dataset.from_dict(
            {"image": [image(s) for s in captioned], "image_id": [s.image_id for s in captioned],
             "captions": [captions[s.image_id] for s in captioned]}, features=caption_features)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # four "Saving the dataset" bars would only be noise
    try:
        DatasetDict(vqa_splits).save_to_disk(os.path.join(dpath, "vqa"))
        DatasetDict(caption_splits).save_to_disk(os.path.join(dpath, "captions"))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _write_json(fpath: str, obj: dict) -> None:
    with open(fpath, "w", encoding="utf-8") as f:
        json.dump(obj, f)
