"""Shared fixtures: tiny checkpoints of both families, written once per session through `make_model`."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image

from stages.models.tiny import make_model

FAMILIES = ["idefics", "idefics2", "idefics3"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_model(f, str(root / f), seed=0) for f in FAMILIES}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    from stages.tasks.synthetic import write_synthetic
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    write_synthetic(root, n_train=24, n_val=12, seed=0)
    return root


def random_image(seed: int, size: int = 32) -> Image.Image:
    """Noise never normalises to all zeros, so Idefics2 never mistakes it for a padding image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
