"""The model card (README.md) of a student's output directory, so the artifact can be shared with what it is.

Hugging Face's conventions: YAML front matter (license, base_model, tags, model-index with the evaluation
results), then Markdown. The card is made from what the directory holds, so it is rewritten whole whenever
something is added: config.json and method.json (the run), losses.jsonl (final losses), evaluations.json
(each `pipeline eval` of this artifact, recorded by record_eval). The licence is the user's: a value set in
the card is kept when it is rewritten.
"""
from __future__ import annotations

import json
import os

import yaml

CARD_FNAME = "README.md"
EVALS_FNAME = "evaluations.json"
HF_TASKS = {"vqa": "visual-question-answering", "yesno": "visual-question-answering",
            "choice": "visual-question-answering", "caption": "image-to-text"}


def _front_matter(fpath: str) -> dict:
    if not os.path.isfile(fpath):
        return {}
    text = open(fpath).read()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return {}
    return yaml.safe_load(text[4: text.index("\n---\n", 4)]) or {}


def _final_losses(fpath: str) -> dict:
    """The last step's losses and lr, and the mean losses of the last epoch."""
    rows = [json.loads(line) for line in open(fpath) if line.endswith("\n")] if os.path.isfile(fpath) else []
    if not rows:
        return {}
    last = [r for r in rows if r["epoch"] == rows[-1]["epoch"]]
    means = {f"{k}_last_epoch_mean": sum(r[k] for r in last) / len(last) for k in ("loss", "l_align", "l_gt")}
    return {"step": rows[-1]["step"], "epoch": rows[-1]["epoch"],
            **{k: rows[-1][k] for k in ("loss", "l_align", "l_gt", "lr")}, **means}


def card_fields(dpath: str) -> dict:
    """Everything the card states, from the files of the student's output directory."""
    from stages.tasks import get_task
    cfg = json.load(open(os.path.join(dpath, "config.json")))
    meta = json.load(open(os.path.join(dpath, "method.json")))
    task, teacher = cfg["task"], cfg["teacher"]
    evals = json.load(open(os.path.join(dpath, EVALS_FNAME))) if os.path.isfile(os.path.join(dpath, EVALS_FNAME)) else {}
    return {"method": meta["method"], "base_model": meta.get("base_model") or {"name": meta.get("model"), "family": meta.get("family")},
            "task": task["name"], "kind": get_task(task["name"]).kind,
            "split": task["query_split"] or task["train_split"], "train_queries": meta.get("train_queries"),
            "shots": teacher["shots"], "sampler": teacher["sampler"], "teacher_seed": teacher["seed"],
            "task_seed": task["seed"], "store_fingerprint": meta.get("store_fingerprint"),
            "training": cfg["student"], "final_losses": _final_losses(os.path.join(dpath, "losses.jsonl")),
            "evaluations": evals}


def _model_index(name: str, fields: dict) -> list[dict]:
    results = []
    for key, m in fields["evaluations"].items():
        scores = [(k, v) for k, v in m.items() if k in ("vqa_accuracy", "cider", "accuracy", "perception", "cognition")]
        if scores:
            results.append({"task": {"type": HF_TASKS[fields["kind"]]},
                            "dataset": {"name": m["task"], "type": m["task"], "split": m.get("split", "eval")},
                            "metrics": [{"type": k, "value": v, "name": f"{key} ({m['n']} queries)"} for k, v in scores]})
    return [{"name": name, "results": results}] if results else []


def render(dpath: str, license_value=None) -> str:
    f = card_fields(dpath)
    base, name = f["base_model"], os.path.basename(os.path.normpath(os.path.abspath(dpath)))
    header = {"base_model": base["name"], "base_model_revision": base.get("revision"),
              "library_name": "mimic-pipeline", "pipeline_tag": HF_TASKS[f["kind"]],
              "tags": list(dict.fromkeys(["mimic", "in-context-learning", f["method"], f["task"]])),
              "mimic": {k: f[k] for k in ("method", "base_model", "task", "split", "train_queries", "shots", "sampler",
                                         "teacher_seed", "task_seed", "store_fingerprint", "training", "final_losses",
                                         "evaluations")}}
    if index := _model_index(name, f):
        header["model-index"] = index
    # The licence is the sharer's to choose (the base model's terms apply to what is built on it).
    licence = f"license: {json.dumps(license_value)}" if license_value else "license:   # yours to set, e.g. apache-2.0"
    losses = f["final_losses"]
    evals = "\n".join(f"| {key} | {m['n']} | " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                                                            if isinstance(v, float)) + " |"
                      for key, m in f["evaluations"].items()) or "| (not evaluated yet: `pipeline eval --mode trained --student DIR`) | | |"
    return f"""---
{licence}
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip()}
---

# {name}: {f["method"]} for {base["name"]}

The {f["method"]} artifact a `mimic-pipeline` student trained so that the zero-shot prompt of `{f["task"]}` behaves
as {f["shots"]}-shot in-context learning (MimIC, CVPR 2025). Base model: `{base["name"]}` ({base.get("family")}),
revision `{base.get("revision")}`, weights sha256 `{base.get("weights_sha256")}`.

## Training

- data: {f["train_queries"]} queries of `{f["task"]}` split `{f["split"]}` (shuffled with seed {f["task_seed"]})
- teacher: {f["shots"]}-shot ICL, sampler `{f["sampler"]}`, seed {f["teacher_seed"]}; store fingerprint `{f["store_fingerprint"]}`
- student: the `training` block in the front matter (method, lr, epochs, loss weights, ...)
- final step {losses.get("step")}: loss {losses.get("loss", 0):.4g}, L_align {losses.get("l_align", 0):.4g}, L_gt {losses.get("l_gt", 0):.4g}

## Evaluation

| evaluation | queries | metrics |
|---|---|---|
{evals}

## How to load it

```python
from stages.api import load_with_heads, prompt_inputs, generation_kwargs, decode
model, processor = load_with_heads("{base["name"]}", "{name}")   # the base model, then this directory
```

See the mimic-pipeline README (Python API) for prompts and generation as `pipeline eval` runs them.
"""


def write_card(dpath: str) -> None:
    """(Re)write DPATH/README.md, keeping a licence the user set; through a temporary file."""
    fpath = os.path.join(dpath, CARD_FNAME)
    text = render(dpath, _front_matter(fpath).get("license"))
    with open(fpath + ".tmp", "w") as f:
        f.write(text)
    os.replace(fpath + ".tmp", fpath)


def record_eval(dpath: str, key: str, metrics: dict) -> None:
    """Add an evaluation of the artifact in `dpath` (a student's output directory) to its card."""
    fpath = os.path.join(dpath, EVALS_FNAME)
    evals = json.load(open(fpath)) if os.path.isfile(fpath) else {}
    evals[key] = metrics
    with open(fpath + ".tmp", "w") as f:
        json.dump(evals, f, indent=2)
    os.replace(fpath + ".tmp", fpath)
    write_card(dpath)
