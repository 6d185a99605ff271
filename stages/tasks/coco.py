"""COCO captions in the Karpathy split file `dataset_coco.json`, with the COCO image folders beside it.

Layout under the data root:
    dataset_coco.json                          images[*]: filepath, filename, cocoid, split, sentences[*].raw
    {filepath}/{filename}                      e.g. val2014/COCO_val2014_000000391895.jpg
"""
from __future__ import annotations

import json
import os

from stages.errors import UserError
from stages.tasks.sample import Sample

KARPATHY_FILE = "dataset_coco.json"
# split asked -> Karpathy split labels it takes. "restval" (the val2014 images outside Karpathy's val and
# test) is training data by the standard convention, so "train" means train + restval (113,287 images).
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def load_coco_captions(root: str, split: str) -> list[Sample]:
    """Every image of the Karpathy `split` ("train" includes "restval"), in file order.

    id = str(cocoid); answers = the raw reference captions, whitespace-stripped; question None.
    Images are not checked here (one stat per image); Sample.load_image reports a missing one.
    """
    if split not in SPLITS:
        raise UserError(f"coco has no split {split!r}; choose one of: {', '.join(SPLITS)}")
    fpath = os.path.join(root, KARPATHY_FILE)
    images = _read_images(fpath)

    samples, seen = [], set()
    for i, im in enumerate(images):
        if not isinstance(im, dict) or any(k not in im for k in ("filepath", "filename", "cocoid", "split")):
            raise UserError(f"{fpath}: images[{i}] lacks one of 'filepath', 'filename', 'cocoid', 'split'")
        if im["split"] not in SPLITS[split]:
            continue
        cocoid = im["cocoid"]
        if cocoid in seen:
            raise UserError(f"{fpath}: duplicate cocoid {cocoid}")
        seen.add(cocoid)
        sentences = im.get("sentences") or []
        captions = tuple(s["raw"].strip() for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str))
        if not captions or len(captions) < len(sentences) or not all(captions):
            raise UserError(f"{fpath}: image {cocoid} has no captions or an empty one (sentences[*].raw)")
        image_fpath = os.path.join(root, im["filepath"], im["filename"])
        samples.append(Sample(id=str(cocoid), image=image_fpath, question=None, answers=captions))
    return samples


def _read_images(fpath: str) -> list[dict]:
    if not os.path.isfile(fpath):
        raise UserError(f"COCO Karpathy split file not found: expected {fpath} (from Karpathy's caption_datasets.zip)")
    try:
        with open(fpath, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{fpath} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{fpath} has no 'images' list; is it Karpathy's dataset_coco.json?")
    return data["images"]
