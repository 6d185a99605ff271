"""The best any MSE-only student can do on a toy-ICL task, measured by activation patching (issue 8).

A student sees the query alone, so the lowest L_align it can reach is the teacher's output averaged
over the demonstrations it cannot see, E[T(query, demos) | query]. On the toy task a query is its
colour: noise in the images moves the targets by nothing measurable, so that mean is the mean over
the training queries with the same answer.

Aligned after self-attention (teacher.capture=attn), replacing every layer's attention output on the
span fixes the whole residual stream there: the embeddings, the attention outputs, and the MLPs of
what they sum to. The answer the patched zero-shot model then predicts is the answer of a student at
the MSE optimum, whatever its heads. Replacing them by each query's own teacher outputs instead must
give the teacher's own answers: the check that the patching is exact.
"""
from __future__ import annotations

import torch

from stages.errors import UserError
from stages.models import load_model
from stages.student import answer_start, make_batch
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


def run(cfg) -> dict:
    """Accuracies (%) on the queries of the after-SA store cfg.teacher.store: zero-shot, the teacher's own
    outputs patched in (≈ k-shot ICL), and the per-answer mean patched in (the MSE-only ceiling)."""
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
    by_answer: dict[tuple, list[torch.Tensor]] = {}
    for it in items:
        by_answer.setdefault(answer_of[it.sample_id], []).append(it.hidden.float())
    mean_of = {a: torch.stack(hs).mean(0) for a, hs in by_answer.items()}
    variants = {"zero_shot": lambda batch: None,
                "teacher": lambda batch: torch.stack([it.hidden.float() for it in batch]),
                "ceiling": lambda batch: torch.stack([mean_of[answer_of[it.sample_id]] for it in batch])}
    accuracies = patched_accuracies(lm, items, lambda sid: samples[sid].load_image(), starts, variants)
    return {**accuracies, "n": len(items)}
