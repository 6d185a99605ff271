"""Stage one: k-shot ICL on the frozen model, storing every layer's output on the query + answer span.

Data parallel by shard: shard boundaries depend only on the query list, each rank owns whole shards
(`storage.manifest.shard_owner`), and a rerun with any world size skips published shards.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
from cachetools import LRUCache, cached

from stages.dist import rank_and_world
from stages.errors import UserError
from stages.models import LoadedModel, load_model
from stages.models.encode import encode, text_mask
from stages.progress import progress
from stages.tasks import get_task
from stages.tasks.pools import icd_pool, query_split, same_picture, support_set, training_queries
from stages.tasks.prompts import build_prompt, instruction, reference_answer
from stages.tasks.sampler import sample_icds
from storage import layout
from storage.manifest import Manifest, creation_stamp, format_version, shard_owner
from storage.writer import Item, Logits, open_for_write

if TYPE_CHECKING:
    from pipeline.config import Config

PROMPT_TEMPLATE = "seed-tab6/v1"  # bump when prompts.py changes what a prompt looks like

# Decoded images, reused by every prompt that shows them (a support image appears in about k prompts),
# are kept up to a memory budget rather than a count: a full-size COCO image decodes to about 1 MB.
IMAGE_CACHE_BYTES = 1 << 30


def _decoded_bytes(image) -> int:
    return image.width * image.height * len(image.getbands())


def fingerprint_fields(cfg: "Config", lm: LoadedModel | None, kind: str) -> dict:
    """Everything besides the query list that determines the stored targets (DESIGN.md, Store).

    With lm None (a dry run) the model's identity, read from the loaded checkpoint, is a placeholder.
    """
    t, task = cfg.teacher, cfg.task
    model = lm.identity() if lm is not None else f"<read at load from {cfg.model.path}>"
    split_by = get_task(task.name).split_by
    # a task without a training split: which of its one labelled set train (the first N of task.seed's shuffle)
    one_set = {"one_set": {"split_by": split_by, "num_queries": task.num_queries}} if split_by else {}
    return {"model": model, "dtype": cfg.model.dtype,
            "prompt": {"template": PROMPT_TEMPLATE, "instruction": instruction(kind, "icl")},
            "task": task.name, "split": query_split(task), "task_seed": task.seed, "answer": task.answer,
            "support": task.support, "shots": t.shots, "sampler": t.sampler, "seed": t.seed, "span": t.span,
            "capture": t.capture, **({"exclude_same_image": True} if t.exclude_same_image else {}),
            **({"logits": t.logits} if t.logits != "off" else {}), **one_set}


def store_dtype(cfg: "Config") -> str:
    """The dtype of the stored targets (the manifest's dtype, so in the fingerprint): teacher.store_dtype,
    by default the model's. The model's outputs are rounded to it (PROTOCOL.md, What the values are)."""
    return cfg.teacher.store_dtype or cfg.model.dtype


def _load_teacher(cfg: "Config") -> tuple[LoadedModel, torch.nn.Module]:
    import deepspeed
    if store_dtype(cfg) == "float64":
        raise UserError("the teacher stores float32, bfloat16, float16 or int8 targets; set teacher.store_dtype to one of these")
    lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype, cfg.model.trust_remote_code)
    if torch.cuda.is_available():  # init_inference puts the model on the current device: this rank's own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
    # Data parallel only: each rank holds the whole model (tp_size 1), so no process group is needed.
    engine = deepspeed.init_inference(lm.model, dtype=lm.model.dtype, replace_with_kernel_inject=False)
    lm.model = engine.module
    return lm, engine


class SpanCapture:
    """Forward hooks that keep, per decoder layer, the last `keep` positions of the MLP (or attention) output.

    Only the query + answer span is kept: the k-shot context is most of the sequence and the
    student never sees it (METHOD.md §3), so slicing in the hook bounds memory by the span.
    """

    def __init__(self, layers: list[torch.nn.Module], capture: str):
        self.keep = 0
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        modules = [layer.mlp if capture == "ffn" else layer.self_attn for layer in layers]
        self.handles = [m.register_forward_hook(functools.partial(self._hook, i)) for i, m in enumerate(modules)]

    def _hook(self, i, module, args, out):
        out = out[0] if isinstance(out, tuple) else out  # self_attn returns (output, weights)
        self.outputs[i] = out[:, -self.keep:].detach().clone()

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.outputs, dim=2)  # [b, keep, l, d]


def answer_logits(logits_tv: torch.Tensor, answer_start: int, setting: str, dtype: torch.dtype) -> Logits:
    """A span's logits [n, vocab] -> the teacher's distributions at its answer positions (PROTOCOL.md, "Reserved:
    logits"): the positions answer_start - 1 ... n - 2, whose next token is an answer token or the EOS."""
    pos = np.arange(answer_start - 1, logits_tv.shape[0] - 1, dtype=np.int32)
    rows = logits_tv[answer_start - 1: -1].float()
    lse = torch.logsumexp(rows, dim=-1).cpu().numpy()
    if setting == "full":
        return Logits(pos, rows.to(dtype).cpu(), lse)
    top = rows.topk(int(setting.split(":")[1]), dim=-1)  # sorted, largest first
    return Logits(pos, top.values.to(dtype).cpu(), lse, top.indices.to(torch.int32).cpu().numpy())


def _largest_k_that_fits(n_tokens: int, n_span: int, shots: int, max_len: int) -> int:
    per_icd = (n_tokens - n_span) / max(shots, 1)
    return max(0, int((max_len - n_span) // per_icd)) if per_icd else shots


def _over_context(qid: str, n: int, n_span: int, shots: int, max_len: int) -> str:
    k_fit = _largest_k_that_fits(n, n_span, shots, max_len)
    if k_fit >= 1:
        return (f"the {shots}-shot prompt of query {qid} is {n} tokens, past the model's context of {max_len}; "
                f"use --shots {k_fit} or fewer")
    return (f"query {qid} is too long: its {shots}-shot prompt is {n} tokens, the query and answer alone {n_span}, "
            f"past the model's context of {max_len}; shorten its question, or skip it with --on-bad-sample skip")


def _bad_sample(policy: str, skipped: dict[str, str], qid: str, reason: str) -> None:
    """teacher.on_bad_sample: fail raises the reason; skip records it (it goes to the shard's marker)."""
    if policy == "fail":
        raise UserError(reason)
    skipped[qid] = reason


def _prompts(build, batch, icd_ids, policy: str, skipped: dict[str, str]) -> list:
    """The batch's prompts; None where an image (the query's or a demonstration's) cannot be loaded."""
    prompts = []
    for (q, _), ids in zip(batch, icd_ids):
        try:
            prompts.append(build(q, ids))
        except UserError as e:
            _bad_sample(policy, skipped, q.id, str(e))
            prompts.append(None)
    return prompts


def _rows(keep_if, *columns):
    """The rows of `columns` where keep_if is not None (the others were refused or skipped)."""
    kept = [i for i, x in enumerate(keep_if) if x is not None]
    return tuple([col[i] for i in kept] for col in columns)


def _capture(lm, engine, capture: SpanCapture, prompts, query_ids, t, max_len, skipped: dict[str, str], answer_starts):
    """One forward of a batch of k-shot prompts: per prompt (span ids int32 [n], hidden [n or kept, l, d], keep,
    logits at the answer positions or None), or None for a prompt longer than the model's context (refused, never
    truncated: METHOD.md §3). answer_starts: per prompt, where its answer starts in its span (with teacher.logits)."""
    if not prompts:
        return []
    enc = encode(lm, prompts)
    rows = []
    for row, (n, n_span, qid) in enumerate(zip(enc.inputs["attention_mask"].sum(-1).tolist(), enc.span_lens, query_ids)):
        if max_len and n > max_len:
            _bad_sample(t.on_bad_sample, skipped, qid, _over_context(qid, n, n_span, t.shots, max_len))
        else:
            rows.append(row)
    out = [None] * len(prompts)
    if not rows:
        return out
    if len(rows) < len(prompts):  # encode again without the refused ones: padding depends on the batch
        enc = encode(lm, [prompts[r] for r in rows])
    capture.keep = max(enc.span_lens)
    device = next(lm.model.parameters()).device  # init_inference moved the model; the engine does not move inputs
    # No KV cache and the logits of the span only (of one position without teacher.logits): at Idefics2-8b's size
    # and a 32-shot prompt of ~2,600 tokens the cache would take ~340 MB and the full logits ~170 MB per prompt.
    with torch.inference_mode():
        logits_btv = engine(**{k: v.to(device) for k, v in enc.inputs.items()}, use_cache=False,
                            logits_to_keep=capture.keep if t.logits != "off" else 1).logits
    hidden_bkld = capture.stacked()
    store_dtype = hidden_bkld.dtype if t.store_dtype == "" else getattr(torch, t.store_dtype)
    for i, (row, n) in enumerate(zip(rows, enc.span_lens)):
        span_ids = np.asarray(enc.span_ids[i], dtype=np.int32)
        hidden_tld, keep = hidden_bkld[i, -n:], None
        if t.span == "text":  # the image tokens' rows are left out
            keep = text_mask(lm, span_ids)
            hidden_tld = hidden_tld[torch.as_tensor(keep, device=hidden_tld.device)]
        logits = (answer_logits(logits_btv[i, -n:], answer_starts[row], t.logits, store_dtype)
                  if t.logits != "off" else None)
        out[row] = (span_ids, hidden_tld, keep, logits)
    return out


def run(cfg: "Config") -> str:
    t, tc = cfg.teacher, cfg.task
    rank, world = rank_and_world(t.rank, t.world_size)
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, query_split(tc), tc.num_queries, seed=tc.seed)
    support = support_set(task, tc.root, tc.train_split, queries, tc.support)
    by_id = {s.id: s for s in support} | {q.id: q for q in queries}
    support_ids, support_answers = icd_pool(support, tc.answer)
    same_picture_ids = same_picture(support, t.exclude_same_image)
    # refuse an impossible k before loading, on the query left the fewest demonstrations
    worst = max(queries, key=lambda q: len(same_picture_ids(q)))
    sample_icds(support_ids, worst.id, t.shots, seed=t.seed, view=0, sampler=t.sampler, answers=support_answers,
                exclude=same_picture_ids(worst))
    lm, engine = _load_teacher(cfg)
    dims = lm.dims
    manifest = Manifest(format_version(store_dtype(cfg)), fingerprint_fields(cfg, lm, task.kind), tuple(q.id for q in queries),
                        t.views, t.shard_size, dims.n_layers, dims.d_model, store_dtype(cfg),
                        **creation_stamp())  # kept by the rank that creates the store; volatile
    writer = open_for_write(t.store, manifest)
    values_dtype = getattr(torch, layout.values_dtype(manifest.dtype))  # int8: float32, quantized by the writer
    published = writer.published()
    mine = [s for s in range(manifest.n_shards) if shard_owner(s, world) == rank and s not in published]
    print(f"teacher rank {rank}/{world}: {len(mine)} of {manifest.n_shards} shards to write into {t.store} "
          f"(fingerprint {manifest.fingerprint[:12]})")
    load_image = cached(LRUCache(IMAGE_CACHE_BYTES, getsizeof=_decoded_bytes))(lambda sid: by_id[sid].load_image())

    def build(q, ids):  # the k-shot prompt of query q with demonstrations ids, answer appended
        return build_prompt(task.kind, "icl", q, [(by_id[i], reference_answer(by_id[i], tc.answer)) for i in ids],
                            answer=reference_answer(q, tc.answer), load=lambda s: load_image(s.id))
    max_len = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    capture = SpanCapture(lm.adapter.decoder_layers(lm.model), t.capture)
    if t.logits != "off":
        from stages.student import answer_start  # (stages.student imports this module)
        answer_starts = {q.id: answer_start(lm, task.kind, q) for q in queries}

    # Each finished shard is written by a background thread while the next shard's forwards run,
    # so the store costs the teacher almost nothing (BENCHMARKS.md, P1). Leaving the `with` waits for
    # the last write, also when a forward fails, so nothing finished is lost.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for shard in progress(mine, desc=f"teacher {t.shots}-shot", unit="shard", disable=rank > 0):
            lo, hi = manifest.shard_bounds(shard)
            jobs = [(q, v) for q in queries[lo:hi] for v in range(t.views)]  # query-major, view-minor
            items, skipped = [], {}  # skipped: query id -> reason (teacher.on_bad_sample skip)
            for b0 in range(0, len(jobs), t.batch_size):
                batch = [(q, v) for q, v in jobs[b0: b0 + t.batch_size] if q.id not in skipped]
                icd_ids = [sample_icds(support_ids, q.id, t.shots, seed=t.seed, view=v, sampler=t.sampler,
                                       answers=support_answers, exclude=same_picture_ids(q)) for q, v in batch]
                prompts = _prompts(build, batch, icd_ids, t.on_bad_sample, skipped)
                batch, icd_ids, prompts = _rows(prompts, batch, icd_ids, prompts)
                targets = _capture(lm, engine, capture, prompts, [q.id for q, _ in batch], t, max_len, skipped,
                                   [answer_starts[q.id] for q, _ in batch] if t.logits != "off" else None)
                batch, icd_ids, targets = _rows(targets, batch, icd_ids, targets)
                items += [Item(q.id, v, span_ids, hidden_tld.to(values_dtype), tuple(ids), keep, logits)
                          for (q, v), ids, (span_ids, hidden_tld, keep, logits) in zip(batch, icd_ids, targets)]
            items = [it for it in items if it.sample_id not in skipped]  # a query refused at a later view
            if pending is not None:
                pending.result()  # one shard in flight at most; a write error surfaces here
            pending = pool.submit(writer.write_shard, shard, items, skipped)
        if pending is not None:
            pending.result()
    return t.store
