"""The embedded default (a tiny Idefics2 and a synthetic VQA set, built on first use) and derived paths.

Everything lands under one cache directory, whatever the working directory, so a second run
reuses the first run's model and data.
"""
from __future__ import annotations

import dataclasses
import os

from pipeline.config import Config

DEFAULT_MODEL = "tiny-idefics2"
DEFAULT_DATA = "synthetic-vqa"


def cache_home() -> str:
    return os.environ.get("MIMIC_PIPELINE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mimic-pipeline")


def default_model_dpath() -> str:
    dpath = os.path.join(cache_home(), "models", DEFAULT_MODEL)
    if not os.path.isfile(os.path.join(dpath, "model.safetensors")):
        from stages.models.tiny import make_model
        print(f"first use: building the embedded default model in {dpath}")
        make_model("idefics2", dpath, seed=0)
    return dpath


def default_data_dpath() -> str:
    dpath = os.path.join(cache_home(), "data", DEFAULT_DATA)
    from stages.tasks.synthetic import DEFAULT_N_TRAIN, write_synthetic
    write_synthetic(dpath, n_train=DEFAULT_N_TRAIN, n_val=32, seed=0)  # a no-op once complete
    return dpath


def resolve(cfg: Config, *, build_defaults: bool = True) -> Config:
    """Fill the empty paths: the embedded default model and data, and each stage's output under run_dir."""
    model, task, teacher, student, ev = cfg.model, cfg.task, cfg.teacher, cfg.student, cfg.eval
    if not model.path and build_defaults:
        model = dataclasses.replace(model, path=default_model_dpath())
    if not task.root and build_defaults:
        task = dataclasses.replace(task, root=default_data_dpath())
    tag = f"{task.name}-{teacher.shots}shot"
    if not teacher.store:
        teacher = dataclasses.replace(teacher, store=os.path.join(cfg.run_dir, f"store-{tag}"))
    if not student.out:
        student = dataclasses.replace(student, out=os.path.join(cfg.run_dir, f"student-{tag}"))
    if not ev.heads:
        ev = dataclasses.replace(ev, heads=os.path.join(student.out, "heads"))
    if not ev.out:
        shots = f"-{ev.shots}shot" if ev.mode == "icl" else ""
        ev = dataclasses.replace(ev, out=os.path.join(cfg.run_dir, f"eval-{ev.mode}{shots}-{task.name}"))
    return dataclasses.replace(cfg, model=model, task=task, teacher=teacher, student=student, eval=ev)
