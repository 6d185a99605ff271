"""Evaluation: zero-shot, k-shot ICL or MimIC generation, scored by VQA accuracy, CIDEr, the MME score or
multiple-choice accuracy (METHOD.md §6)."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from stages.card import record_eval
from stages.errors import UserError
from stages.methods import METHOD_FNAME, load_artifact
from stages.models import load_model
from stages.models.encode import encode
from stages.models.heads import attach, build_heads, load_heads
from stages.progress import progress
from stages.tasks import get_task
from stages.tasks.pools import eval_queries, icd_pool, same_picture, support_set, training_queries
from stages.tasks.prompts import build_prompt, reference_answer
from stages.tasks.sampler import sample_icds

if TYPE_CHECKING:
    from pipeline.config import Config


def _write_json(fpath: str, obj) -> None:
    """Through a temporary file: a kill leaves the old file or the new one, never half of one."""
    with open(fpath + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(fpath + ".tmp", fpath)


def cut_at_stop_words(text: str, stop_words: tuple[str, ...]) -> str:
    ends = [i for i in (text.find(w) for w in stop_words) if i >= 0]
    return (text[: min(ends)] if ends else text).strip()


def generation_kwargs(tok, *, max_new_tokens: int, num_beams: int) -> dict:
    """model.generate's settings: beam search, length penalty 0 (METHOD.md §6)."""
    return {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "length_penalty": 0.0, "do_sample": False,
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}


def decode(tok, out, prompt_len: int, stop_words: tuple[str, ...]) -> list[str]:
    """The generated text after the prompt, cut at the first stop word and stripped (METHOD.md §6)."""
    texts = tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return [cut_at_stop_words(t, stop_words) for t in texts]


@torch.no_grad()
def generate(lm, inputs: dict, *, max_new_tokens: int, stop_words: tuple[str, ...], num_beams: int) -> list[str]:
    # generate() numbers positions from the attention mask itself, step by step.
    inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    out = lm.model.generate(**inputs, **generation_kwargs(lm.tokenizer, max_new_tokens=max_new_tokens,
                                                          num_beams=num_beams))
    return decode(lm.tokenizer, out, inputs["input_ids"].shape[1], stop_words)


def score(kind: str, task_name: str, predictions: dict[str, str], queries, *, normalize_refs: bool = False,
          unparsed: str = "wrong", seed: int = 0) -> dict:
    from stages.metrics import choice_scores, cider, mme_scores, vqa_accuracy
    if kind == "yesno":
        return mme_scores(predictions, queries)
    if kind == "choice":
        return choice_scores(predictions, queries, unparsed=unparsed, seed=seed)
    if kind == "vqa":
        per = [vqa_accuracy(predictions[q.id], list(q.answers), stem=task_name == "okvqa", normalize_refs=normalize_refs)
               for q in queries]
        return {"vqa_accuracy": 100.0 * sum(per) / len(per)}
    return {"cider": cider(predictions, {q.id: list(q.answers) for q in queries})}


def align(cfg: "Config") -> dict:
    """L_align and L_gt over a teacher store (e.g. of held-out queries), with fresh and with trained heads.

    MimIC's heads should mimic ICL on queries they never saw: L_align with the trained heads against
    L_align with the heads as the student initialises them (same seed).
    """
    from stages.student import align_loss
    from storage.reader import open_manifest, read_items

    ev, tc = cfg.eval, cfg.task
    fields = open_manifest(cfg.teacher.store).fingerprint_fields
    lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype, cfg.model.trust_remote_code)
    lm.model.to("cuda" if torch.cuda.is_available() else "cpu")
    if fields["model"] != lm.identity():
        raise UserError(f"store {cfg.teacher.store} was made with another model than {cfg.model.path}")
    samples = {s.id: s for s in get_task(fields["task"]).load(tc.root, fields["split"])}
    items = list(read_items(cfg.teacher.store))
    torch.manual_seed(cfg.student.seed)  # the heads the student starts from
    dims = lm.dims
    fresh = build_heads(dims.n_layers, dims.n_heads, dims.head_dim, cfg.student.log_z2 == "masked")
    trained = load_heads(ev.heads, lm)
    metrics = {"store": cfg.teacher.store, "heads": ev.heads}
    for name, heads in (("init", fresh), ("trained", trained)):
        attach(lm, heads, replace=True)
        result = align_loss(lm, heads, items, lambda sid: samples[sid].load_image(), fields["capture"])
        metrics |= {f"l_align_{name}": result["l_align"], f"l_gt_{name}": result["l_gt"], "n": result["n"],
                    f"l_align_per_layer_{name}": result["l_align_per_layer"]}
    metrics["l_align_ratio"] = metrics["l_align_trained"] / metrics["l_align_init"]
    os.makedirs(ev.out, exist_ok=True)
    _write_json(os.path.join(ev.out, "metrics.json"), metrics)
    _record_on_card(os.path.dirname(os.path.normpath(ev.heads)), "align", metrics)
    return metrics


def _record_on_card(student_dpath: str, key: str, metrics: dict) -> None:
    """An evaluation of a student's artifact goes on its model card (not of heads that are no student's output)."""
    if os.path.isfile(os.path.join(student_dpath, METHOD_FNAME)):
        record_eval(student_dpath, key, metrics)


def run(cfg: "Config") -> dict:
    ev, tc = cfg.eval, cfg.task
    if ev.mode == "align":
        return align(cfg)
    task = get_task(tc.name)
    train = training_queries(task, tc.root, tc.train_split, tc.num_queries, seed=tc.seed)
    support = support_set(task, tc.root, tc.train_split, train, tc.support)
    queries = eval_queries(task, tc.root, tc.eval_split, ev.num_samples, support, seed=tc.seed)
    lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype, cfg.model.trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm.model.to(device)
    by_id = {s.id: s for s in support}
    support_ids, support_answers = icd_pool(support, tc.answer)
    same_picture_ids = same_picture(support, ev.exclude_same_image)
    if ev.mode == "mimic":
        attach(lm, load_heads(ev.heads, lm))
    # trained: any method's artifact on the zero-shot prompt the student trained on ([BOS] + query, as mimic)
    trained = {"method": load_artifact(ev.student, lm), "student": ev.student} if ev.mode == "trained" else {}
    prompt_mode = "mimic" if ev.mode == "trained" else ev.mode
    shots = ev.shots if ev.mode == "icl" else 0
    os.makedirs(ev.out, exist_ok=True)
    # metrics.json of an earlier run would sit beside this run's config until this one finishes
    if os.path.exists(os.path.join(ev.out, "metrics.json")):
        os.remove(os.path.join(ev.out, "metrics.json"))
    with open(os.path.join(ev.out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    max_len = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)

    predictions: dict[str, str] = {}
    for lo in progress(range(0, len(queries), ev.batch_size), desc=f"eval {ev.mode}", unit="batch"):
        batch = queries[lo: lo + ev.batch_size]
        prompts = []
        for q in batch:
            icd_ids = sample_icds(support_ids, q.id, shots, seed=ev.seed, view=0, sampler=ev.sampler,
                                  answers=support_answers, exclude=same_picture_ids(q))
            icds = [(by_id[i], reference_answer(by_id[i], tc.answer)) for i in icd_ids]
            prompts.append(build_prompt(task.kind, prompt_mode, q, icds))
        enc = encode(lm, prompts, max_len=max_len)
        texts = generate(lm, {k: v.to(device) for k, v in enc.inputs.items()}, max_new_tokens=task.max_new_tokens, stop_words=task.stop_words,
                         num_beams=ev.num_beams)
        predictions.update(zip((q.id for q in batch), texts))

    metrics = {"task": tc.name, "mode": ev.mode, **trained, "shots": shots, "n": len(queries),
               **score(task.kind, tc.name, predictions, queries, normalize_refs=ev.vqa_normalize_refs,
                     unparsed=ev.unparsed, seed=ev.seed)}
    tmp = os.path.join(ev.out, "predictions.jsonl.tmp")
    with open(tmp, "w") as f:
        for q in queries:
            f.write(json.dumps({"id": q.id, "prediction": predictions[q.id], "answers": list(q.answers)}) + "\n")
    os.replace(tmp, os.path.join(ev.out, "predictions.jsonl"))
    _write_json(os.path.join(ev.out, "metrics.json"), metrics)
    if ev.mode in ("mimic", "trained"):
        student_dpath = ev.student if ev.mode == "trained" else os.path.dirname(os.path.normpath(ev.heads))
        _record_on_card(student_dpath, f"{ev.mode}-{tc.name}-{tc.eval_split}", {**metrics, "split": tc.eval_split})
    return metrics
