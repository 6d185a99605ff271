"""Seed Tab. 11: how close each trained method's latents come to k-shot ICL's (METHOD.md §6, Analysis).

The seed measures "the latent representation of the first answer token". We take each decoder layer's output
(the residual stream) at the last prompt position, the one whose logits give the first answer token: the seed's
distances (30–60 for a 4,096-wide model) are of a residual stream's size, not of one FFN output's. The authors'
public repository has no code for it (its src/analyze.py only collects evaluation metrics), so this is our reading.

Both latents come from forward passes on held-out queries (the evaluation queries): the k-shot ICL prompt on the
frozen model, and the zero-shot prompt ([BOS] + query, as the student trained) with a run's artifact on.
The stored FFN targets are a different quantity and are not used.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from stages.errors import UserError
from stages.methods import METHODS, load_artifact
from stages.models import load_model
from stages.models.encode import encode
from stages.progress import progress
from stages.tasks import get_task
from stages.tasks.pools import eval_queries, icd_pool, same_picture, support_set, training_queries
from stages.tasks.prompts import build_prompt, reference_answer
from stages.tasks.sampler import sample_icds

if TYPE_CHECKING:
    from pipeline.config import Config


@torch.no_grad()
def last_position_latents(lm, prompts, batch_size: int) -> torch.Tensor:
    """[n, l, d]: every decoder layer's output at each prompt's last position (left padding puts it last)."""
    layers = lm.adapter.decoder_layers(lm.model)
    captured: list[torch.Tensor | None] = [None] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out)[:, -1])) for i, layer in enumerate(layers)]
    device = next(lm.model.parameters()).device
    max_len = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    rows = []
    try:
        for lo in range(0, len(prompts), batch_size):
            inputs = encode(lm, prompts[lo: lo + batch_size], max_len=max_len).inputs
            lm.model(**{k: v.to(device) for k, v in inputs.items()})
            rows.append(torch.stack(captured, dim=1).float().cpu())  # [b, l, d]
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows)


def _label(run_dpath: str) -> str:
    config = json.load(open(os.path.join(run_dpath, "config.json")))["student"]
    fpath = os.path.join(run_dpath, "method.json")
    method = json.load(open(fpath))["method"] if os.path.isfile(fpath) else "mimic"
    aligned = "align" in METHODS[method].LOSSES and config["w_align"] > 0  # LIVE takes the KL instead
    return f"{method}, {'with' if aligned else 'without'} L_align"


def _check_run(run: str, cfg: "Config") -> None:
    """Refuse a run that is not a student's, or one of another model or task than the latents are taken on."""
    fpath = os.path.join(run, "config.json")
    if not os.path.isfile(fpath):
        raise UserError(f"{run} is not a student run directory (no config.json); give `pipeline run student` outputs")
    config = json.load(open(fpath))
    trained_on, mine = (config["model"]["path"], config["task"]["name"]), (cfg.model.path, cfg.task.name)
    if trained_on != mine:
        raise UserError(f"{run} was trained with {' on '.join(trained_on)}, the first run with {' on '.join(mine)}; "
                        "compare runs of one model and task")


def l2(cfg: "Config", runs: list[str], out_dpath: str) -> dict:
    """Per layer, the mean over held-out queries of ‖latent(run) − latent(k-shot ICL)‖₂, for the zero-shot prompt
    without anything trained and with each run's artifact; k = cfg.teacher.shots. Writes l2.json, l2.md, l2.png."""
    ev, tc = cfg.eval, cfg.task
    task = get_task(tc.name)
    train = training_queries(task, tc.root, tc.train_split, tc.num_queries, seed=tc.seed)
    support = support_set(task, tc.root, tc.train_split, train, tc.support)
    queries = eval_queries(task, tc.root, tc.eval_split, ev.num_samples, support, seed=tc.seed)
    by_id = {s.id: s for s in support}
    support_ids, support_answers = icd_pool(support, tc.answer)
    same_picture_ids = same_picture(support, ev.exclude_same_image)
    k = cfg.teacher.shots
    icl_prompts = [build_prompt(task.kind, "icl", q, [(by_id[i], reference_answer(by_id[i], tc.answer)) for i in
                                                     sample_icds(support_ids, q.id, k, seed=ev.seed, view=0,
                                                                 sampler=ev.sampler, answers=support_answers,
                                                                 exclude=same_picture_ids(q))])
                   for q in queries]
    zero_prompts = [build_prompt(task.kind, "mimic", q, []) for q in queries]

    def fresh_model():
        lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype, cfg.model.trust_remote_code)
        lm.model.to("cuda" if torch.cuda.is_available() else "cpu")
        return lm

    lm = fresh_model()
    icl = last_position_latents(lm, icl_prompts, ev.batch_size)
    rows = {"zero-shot": (None, last_position_latents(lm, zero_prompts, ev.batch_size))}
    for run in progress(runs, desc="l2", unit="run"):
        _check_run(run, cfg)
        lm = fresh_model()  # one artifact at a time: LoRA is injected in place
        load_artifact(run, lm)
        rows[f"{_label(run)} ({os.path.basename(os.path.normpath(run))})"] = (run, last_position_latents(lm, zero_prompts, ev.batch_size))
    per_layer = {name: (latents - icl).norm(dim=-1).mean(0).tolist() for name, (_, latents) in rows.items()}
    result = {"shots": k, "n": len(queries), "task": tc.name, "latent": "decoder layer output, last prompt position",
              "runs": {name: run for name, (run, _) in rows.items()}, "l2_per_layer": per_layer}
    os.makedirs(out_dpath, exist_ok=True)
    with open(os.path.join(out_dpath, "l2.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dpath, "l2.md"), "w") as f:
        f.write(table(result))
    _plot(result, os.path.join(out_dpath, "l2.png"))
    return result


def table(result: dict) -> str:
    """Markdown shaped like seed Tab. 11: one row per method, its mean over layers, then each layer."""
    n_layers = len(next(iter(result["l2_per_layer"].values())))
    head = ["method", "mean", *(f"layer {i}" for i in range(n_layers))]
    lines = [f"L2 distance to {result['shots']}-shot ICL ({result['latent']}; {result['n']} held-out {result['task']} "
             "queries)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, values in result["l2_per_layer"].items():
        lines.append(f"| {name} | {sum(values) / len(values):.2f} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, fpath: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in result["l2_per_layer"].items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"mean L2 to {result['shots']}-shot ICL")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)
