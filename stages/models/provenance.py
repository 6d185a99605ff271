"""Which base model a trained artifact belongs to: recorded when the student saves it, checked when it is loaded.

Heads of the right shape load onto any model with the same dimensions (an instruct and a base checkpoint, two
seeds of the toy model), so shapes say nothing: the record holds a hash of the model's configuration and of
its weight files, and the hub revision when the model came from the hub.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re

from stages.errors import UserError

# Keys that change with how a model was loaded, not with which model it is (dtype: the load's dtype).
_LOAD_KEYS = ("dtype", "torch_dtype", "transformers_version")


def _stable(config: dict) -> dict:
    return {k: _stable(v) if isinstance(v, dict) else v for k, v in config.items()
            if k not in _LOAD_KEYS and not k.startswith("_")}


def config_sha256(lm) -> str:
    text = json.dumps({"family": lm.family, "config": _stable(lm.model.config.to_diff_dict())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(path: str) -> str:
    """sha256 of the model's safetensors files, one after the other in name order (`sha256sum model.safetensors`
    for a single file); a pass over the weights: seconds per GB, so taken once per process while the files'
    sizes and times stay the same (an artifact's parts each check the model they load onto)."""
    fpaths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return _sha256(tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in fpaths))


@functools.cache
def _sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for fpath, _, _ in files:
        with open(fpath, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def hub_revision(path: str) -> str | None:
    """The commit of a hub snapshot (huggingface_hub keeps it in the path: .../snapshots/<commit>/)."""
    m = re.search(r"/snapshots/([0-9a-f]{40})/?$", os.path.realpath(path))
    return m.group(1) if m else None


def base_model(lm, name: str) -> dict:
    """The record of `lm`; name: how the user named it (a hub id or a directory)."""
    return {"name": name, "family": lm.family, "revision": hub_revision(lm.path),
            "config_sha256": config_sha256(lm), "weights_sha256": weights_sha256(lm.path)}


def check_base_model(recorded: dict | None, lm, where: str) -> None:
    """Refuse an artifact whose record names another model than `lm`. Artifacts saved before the record
    existed hold none: the shape checks of each part are all there is then."""
    if not recorded:
        return
    config, weights = config_sha256(lm), weights_sha256(lm.path)
    if (recorded["config_sha256"], recorded["weights_sha256"]) != (config, weights):
        raise UserError(f"{where} was trained on base model {recorded['name']} (weights sha256 "
                        f"{recorded['weights_sha256'][:12]}), not on {lm.path} (weights sha256 {weights[:12]}); "
                        "load it onto the model it was trained on")
