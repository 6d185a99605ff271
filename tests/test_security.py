"""Nothing untrusted is unpickled, remote code runs only when asked, store paths stay inside the store.

(Paths read from a marker that try to leave the store are refused through the CLI in
tests/test_bad_input.py::test_marker_path_escaping_the_store_is_refused, and in storage by
tests/test_storage.py::test_marker_paths_cannot_escape_the_root.)
"""
from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from pipeline.config import Config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pipeline", "stages", "storage")  # the installed package: what `pipeline` runs


def _calls(name: str):
    """(file, line, call node) of every call to something whose dotted name ends in `name`."""
    for top in SOURCES:
        for dpath, _, fnames in os.walk(os.path.join(REPO, top)):
            for fname in fnames:
                if not fname.endswith(".py"):
                    continue
                fpath = os.path.join(dpath, fname)
                tree = ast.parse(open(fpath).read(), fpath)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                        yield os.path.relpath(fpath, REPO), node.lineno, node


def test_no_pickle_and_torch_load_only_with_weights_only():
    for top in SOURCES:
        for dpath, _, fnames in os.walk(os.path.join(REPO, top)):
            for fname in (f for f in fnames if f.endswith(".py")):
                text = open(os.path.join(dpath, fname)).read()
                assert not re.search(r"\b(pickle|dill|cloudpickle)\.loads?\(|import dill|import cloudpickle", text), \
                    f"{fname} unpickles"
    for where, line, call in _calls("torch.load"):
        kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kw.get("weights_only") == "True", f"{where}:{line}: torch.load without weights_only=True"


def test_remote_code_only_when_the_user_asks():
    assert Config().model.trust_remote_code is False
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    calls = list(_calls("from_pretrained"))
    assert calls, "no from_pretrained call found"
    for where, line, call in calls:
        kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kw.get("trust_remote_code") not in (None, "True"), \
            f"{where}:{line}: from_pretrained must pass trust_remote_code from the config"


class _Exploit:
    """A pickle that runs code when loaded: it would create the file named by `target`."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_student_refuses_a_checkpoint_that_is_not_just_tensors(model_dirs, data_root, tmp_path):
    """A planted DeepSpeed checkpoint with a code-running pickle: the resume refuses it, nothing runs."""
    from pipeline.defaults import resolve
    from stages import teacher

    store, out = str(tmp_path / "store"), tmp_path / "student"
    sets = [f"model.path={model_dirs['idefics2']}", f"task.root={data_root}", f"teacher.store={store}",
            "task.num_queries=8", "teacher.shots=2", "teacher.shard_size=4"]
    teacher.run(resolve(load_config(None, sets)))
    step_dpath = out / "checkpoints" / "step4"
    step_dpath.mkdir(parents=True)
    (out / "checkpoints" / "last_complete").write_text("step4")
    pwned = tmp_path / "pwned"
    payload = {"module": {}, "exploit": _Exploit(str(pwned))}
    with open(step_dpath / "mp_rank_00_model_states.pt", "wb") as f:
        torch.save(payload, f)
    # Check the payload is live: an unguarded load would run it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(step_dpath / "mp_rank_00_model_states.pt", weights_only=True)

    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp_path / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "student", *[a for s in sets for a in ("--set", s)],
           "--set", f"student.out={out}", "--set", "student.zero_stage=0"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0, result.stderr[-2000:]
    assert not pwned.exists(), "the checkpoint's pickle ran code"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step4" in errors[0] and "weights_only" in errors[0], result.stderr[-2000:]
    assert not (out / "heads").exists()
