"""Shared fixtures: tiny checkpoints of both families, written once per session through `make_model`, and
for every test its own working directory and MIMIC_PIPELINE_HOME, whatever was run in the checkout."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

from stages.models.tiny import make_model

FAMILIES = ["idefics", "idefics2", "idefics3"]

# No time limit per example: on a loaded machine one can take past hypothesis's 200 ms default, a failure
# that says nothing about the code.
settings.register_profile("loaded-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("loaded-machine")


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """The embedded default is built under a home of this session, never the user's ~/.cache/mimic-pipeline;
    commands a test starts inherit it (a test that needs a home of its own sets one). Session and module
    fixtures run in a directory of this session, tests in their own (private_cwd)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIMIC_PIPELINE_HOME", str(tmp_path_factory.mktemp("home")))
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(autouse=True)
def private_cwd(tmp_path_factory, monkeypatch):
    """Each test runs in an empty directory of its own, so the default run_dir `runs/` is neither what the
    user ran in the checkout (`pipeline run all`) nor another test's."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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


@pytest.fixture
def one_thread():
    """The toy model's ops are too small to gain from a second thread; on a shared machine two wait on each other."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_image(seed: int, size: int = 32) -> Image.Image:
    """Noise never normalises to all zeros, so Idefics2 never mistakes it for a padding image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def pipeline(monkeypatch, capsys, tmp_path):
    """run("run", "teacher", ...) -> (exit code, stdout, stderr), as the `pipeline` command gives them (in-process)."""
    import sys

    from pipeline.cli import main
    monkeypatch.setenv("MIMIC_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["pipeline", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err
    return run
