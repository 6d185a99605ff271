"""The best any MSE-only student can do on a toy task, measured by activation patching (issues 8 and 15).

A student sees the query alone, so the lowest L_align it can reach is the teacher's output averaged
over the demonstrations it cannot see, E[T(query, demos) | query]. Two estimates of that mean:
- a store with V > 1 views (teacher.views): the mean over each query's own V demonstration draws;
  needed wherever queries with one answer differ (the attribute family: a "left" square may be any
  colour, size or level), where the per-answer mean would leak the label;
- one view: the mean over the training queries with the same answer. On the lookup family a query is
  its colour, and noise in the images moves the targets by nothing measurable, so those are draws of
  the same query.

Aligned after self-attention (teacher.capture=attn), replacing every layer's attention output on the
span fixes the whole residual stream there: the embeddings, the attention outputs, and the MLPs of
what they sum to. The answer the patched zero-shot model then predicts is the answer of a student at
the MSE optimum, whatever its heads. Replacing them by each query's own teacher outputs instead must
give the teacher's own answers: the check that the patching is exact.
"""
from __future__ import annotations

import torch

from stages.batches import make_batch
from stages.errors import UserError
from stages.models import load_model
from stages.student import answer_start
from stages.tasks import get_task
from storage.reader import open_manifest, read_items


@torch.no_grad()
def patched_accuracies(lm, items, images_of, starts: dict[str, int], variants: dict, batch_size: int = 50) -> dict:
    """{name: teacher-forced accuracy (%) on each item's first answer token} with every layer's attention
    output on the span replaced by variants[name](batch) [b, span, layers, d] (None: nothing replaced).
    Each batch is built once and run once per variant."""
    layers = lm.adapter.decoder_layers(lm.model)
    patch = {}

    def replace(layer: int, out: tuple):
        if not patch:
            return None
        hidden = out[0].clone()
        n = patch["outputs"].shape[1]
        hidden[:, -n:] = patch["outputs"][:, :, layer].to(hidden.dtype)
        return (hidden, *out[1:])

    handles = [layer.self_attn.register_forward_hook(lambda module, args, out, i=i: replace(i, out))
               for i, layer in enumerate(layers)]
    hits = dict.fromkeys(variants, 0)
    try:
        for lo in range(0, len(items), batch_size):
            batch = items[lo: lo + batch_size]
            inputs, _, _, _ = make_batch(lm, batch, [[images_of(it.sample_id)] for it in batch])
            for name, outputs_of in variants.items():
                patch.clear()
                if (replacement := outputs_of(batch)) is not None:
                    patch["outputs"] = replacement
                logits = lm.model(**inputs).logits
                t = logits.shape[1]
                for row, it in enumerate(batch):  # spans are right-aligned: span index j is position t - n + j
                    at = t - len(it.token_ids) + starts[it.sample_id]
                    hits[name] += int(logits[row, at - 1].argmax() == inputs["input_ids"][row, at])
    finally:
        for h in handles:
            h.remove()
    return {name: 100.0 * h / len(items) for name, h in hits.items()}


def mse_optimum(items, answer_of: dict[str, tuple], views: int):
    """item -> the teacher outputs [span, layers, d] an MSE-only student can best match on its query: the
    mean over the query's own views (views > 1), or over the training queries with its answer (one view)."""
    group_of = (lambda it: it.sample_id) if views > 1 else (lambda it: answer_of[it.sample_id])
    groups: dict = {}
    for it in items:
        groups.setdefault(group_of(it), []).append(it.hidden.float())
    mean_of = {g: torch.stack(hs).mean(0) for g, hs in groups.items()}
    return lambda it: mean_of[group_of(it)]


def run(cfg) -> dict:
    """Accuracies (%) on the queries of the after-SA store cfg.teacher.store (view 0 of each): zero-shot, the
    teacher's own outputs patched in (≈ k-shot ICL), and the mean over demonstration draws patched in (the
    MSE-only ceiling: over the query's views, or with one view over the queries with the same answer)."""
    manifest = open_manifest(cfg.teacher.store)
    if manifest.fingerprint_fields.get("capture") != "attn":
        raise UserError(f"the MSE ceiling needs a store aligned after self-attention (teacher.capture=attn); "
                        f"{cfg.teacher.store} holds {manifest.fingerprint_fields.get('capture')}")
    lm = load_model(cfg.model.path, cfg.model.family, "float32", cfg.model.trust_remote_code)
    task = get_task(cfg.task.name)
    samples = {s.id: s for s in task.load(cfg.task.root, cfg.task.train_split)}
    items = list(read_items(cfg.teacher.store))
    if any(len(it.token_ids) != len(items[0].token_ids) or not it.keep.all() for it in items):
        raise UserError("the MSE ceiling needs spans of one length with every token stored (the toy task with "
                        "teacher.span=all)")
    starts = {it.sample_id: answer_start(lm, task.kind, samples[it.sample_id]) for it in items}
    answer_of = {it.sample_id: tuple(it.token_ids[starts[it.sample_id]:].tolist()) for it in items}
    optimum = mse_optimum(items, answer_of, manifest.views)
    variants = {"zero_shot": lambda batch: None,
                "teacher": lambda batch: torch.stack([it.hidden.float() for it in batch]),
                "ceiling": lambda batch: torch.stack([optimum(it) for it in batch])}
    measured = [it for it in items if it.view == 0]  # the other views enter the mean only
    accuracies = patched_accuracies(lm, measured, lambda sid: samples[sid].load_image(), starts, variants)
    return {**accuracies, "n": len(measured), "views": manifest.views}
