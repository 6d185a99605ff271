"""Captions in Karpathy's split files: COCO (`dataset_coco.json`) and Flickr30k (`dataset_flickr30k.json`).

Layout under the data root:
    dataset_coco.json                          images[*]: filepath, filename, cocoid, split, sentences[*].raw
    {filepath}/{filename}                      e.g. val2014/COCO_val2014_000000391895.jpg
Flickr30k (stages/tasks/flickr30k.py) has the same file without filepath and cocoid, and its images in one folder.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from stages.errors import UserError
from stages.tasks.jsonfile import read_json
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
    return load_karpathy(root, split, "coco", KARPATHY_FILE, ("filepath", "filename", "cocoid", "split"), "cocoid",
                         lambda im: os.path.join(root, im["filepath"], im["filename"]))


def load_karpathy(root: str, split: str, name: str, fname: str, keys: tuple[str, ...], id_key: str,
                  image_fpath: Callable[[dict], str]) -> list[Sample]:
    """The images of a Karpathy split file `fname` under root; keys: the fields every entry needs;
    id_key: the one whose value is the sample id; image_fpath(entry): where its image is."""
    if split not in SPLITS:
        raise UserError(f"{name} has no split {split!r}; choose one of: {', '.join(SPLITS)}")
    fpath = os.path.join(root, fname)
    images = _read_images(fpath, name, fname)

    samples, seen = [], set()
    for i, im in enumerate(images):
        if not isinstance(im, dict) or any(k not in im for k in keys):
            raise UserError(f"{fpath}: images[{i}] lacks one of {', '.join(repr(k) for k in keys)}")
        if im["split"] not in SPLITS[split]:
            continue
        sid = im[id_key]
        if sid in seen:
            raise UserError(f"{fpath}: duplicate {id_key} {sid}")
        seen.add(sid)
        sentences = im.get("sentences") or []
        captions = tuple(s["raw"].strip() for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str))
        if not captions or len(captions) < len(sentences) or not all(captions):
            raise UserError(f"{fpath}: image {sid} has no captions or an empty one (sentences[*].raw)")
        samples.append(Sample(id=str(sid), image=image_fpath(im), question=None, answers=captions))
    return samples


def _read_images(fpath: str, name: str, fname: str) -> list[dict]:
    label = "COCO" if name == "coco" else name
    data = read_json(fpath, f"{label} Karpathy split file not found: expected {fpath} (from Karpathy's caption_datasets.zip)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{fpath} has no 'images' list; is it Karpathy's {fname}?")
    return data["images"]
