"""Flickr30k captions in Karpathy's split file `dataset_flickr30k.json`, with the release's image folder beside it.

Layout under the data root:
    dataset_flickr30k.json     images[*]: filename, split (train 29,000 / val 1,014 / test 1,000), sentences[*].raw
    flickr30k-images/{filename}    e.g. flickr30k-images/1000092795.jpg (the official flickr30k-images.tar.gz)
The sample id is the file name without its extension, the Flickr photo id.
"""
from __future__ import annotations

import os

from stages.tasks.coco import load_karpathy
from stages.tasks.sample import Sample

KARPATHY_FILE = "dataset_flickr30k.json"
IMAGE_DIR = "flickr30k-images"


def load_flickr30k(root: str, split: str) -> list[Sample]:
    """Every image of the Karpathy `split` (train, val or test), in file order, with its 5 reference captions."""
    samples = load_karpathy(root, split, "flickr30k", KARPATHY_FILE, ("filename", "split"), "filename",
                            lambda im: os.path.join(root, IMAGE_DIR, im["filename"]))
    return [Sample(id=os.path.splitext(s.id)[0], image=s.image, question=None, answers=s.answers) for s in samples]
