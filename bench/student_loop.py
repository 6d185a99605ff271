"""The student's step, as stages/student.py::run takes it with the same project functions, fed three ways:
targets streamed from the store (TargetReader, as the stage), targets already in RAM (P2's baseline), and
targets computed online by a k-shot teacher forward without grad inside every step (the authors' design, P3).

As a child process (P3; one per mode and k, so that ru_maxrss is this loop's peak alone):
    .venv/bin/python -m bench.student_loop --mode cached --shots 32 --store STORE --epochs 3
    .venv/bin/python -m bench.student_loop --mode online --shots 32 --epochs 2
"""
from __future__ import annotations

import argparse
import dataclasses
import resource

import numpy as np
import torch

from bench.common import Timer, config, emit, loadavg, set_threads, stats


@dataclasses.dataclass
class Setup:
    cfg: object
    lm: object
    heads: object
    engine: object
    by_id: dict
    queries: list
    support_ids: list
    task: object
    reader: object | None


def setup(cfg, with_reader: bool = True) -> Setup:
    """stages/student.py::run up to its loop, through the stage's own helpers: model, reader, the method's parts,
    the Student module, AdamW and deepspeed.initialize."""
    from stages.methods import METHODS
    from stages.models import load_model
    from stages.student import _init_distributed, _setup_model, _setup_optimizer, batch_split
    from stages.tasks import get_task
    from stages.tasks.pools import support_set, training_queries
    from storage.reader import TargetReader
    s, tc = cfg.student, cfg.task
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, tc.train_split, tc.num_queries, seed=tc.seed)
    support = support_set(task, tc.root, tc.train_split, queries, tc.support)
    by_id = {x.id: x for x in support} | {q.id: q for q in queries}
    lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype)
    reader = TargetReader(cfg.teacher.store, seed=s.seed, shuffle_buffer=s.shuffle_buffer) if with_reader else None
    _init_distributed(0, 1)
    method = METHODS[s.method]
    parts, model = _setup_model(cfg, lm, method)
    micro, accumulation = batch_split(s.global_batch, s.micro_batch, 1)
    assert accumulation == 1, "the bench runs one micro batch per step"
    n_head_params = sum(sum(p.numel() for p in part.parameters() if p.requires_grad)
                        for part in parts.values() if part is not lm.model)
    engine, _ = _setup_optimizer(cfg, model, method.param_groups(parts, s), 1000, micro, accumulation, n_head_params)
    heads = next(part for part in parts.values() if part is not lm.model)
    return Setup(cfg, lm, heads, engine, by_id, queries, [x.id for x in support], task, reader)


def step(S: Setup, span_ids: list[list[int]], sample_ids: list[str], targets: list[torch.Tensor]) -> float:
    """One optimiser step on one micro batch: the body of the stage's inner loop (ce_on = all)."""
    from stages.models.encode import inputs_from_spans
    from stages.student import losses
    s, dims = S.cfg.student, S.lm.dims
    inputs = inputs_from_spans(S.lm, span_ids, [[S.by_id[q].load_image()] for q in sample_ids])
    t = inputs["input_ids"].shape[1]
    target = torch.zeros(len(span_ids), t, dims.n_layers, dims.d_model)
    span_mask = torch.zeros(len(span_ids), t)
    ce_mask = inputs["attention_mask"].clone()
    for b, hidden in enumerate(targets):
        n = hidden.shape[0]
        target[b, t - n:] = hidden.float()
        span_mask[b, t - n:] = 1
    inputs = {k: v.to(S.engine.device) for k, v in inputs.items()}
    logits, hidden = S.engine(**inputs)
    l_align, l_gt = losses(logits, hidden, target.to(hidden), span_mask.to(hidden.device),
                           ce_mask.to(hidden.device), inputs["input_ids"])
    loss = s.w_align * l_align + s.w_ce * l_gt
    S.engine.backward(loss)
    S.engine.step()
    return loss.item()


def cached_epoch(S: Setup, items, steps: int) -> None:
    """items: an iterator of stored Items (streamed) or a list (in RAM)."""
    items = iter(items)
    gb = S.cfg.student.global_batch
    for _ in range(steps):
        batch = [next(items) for _ in range(gb)]
        step(S, [it.token_ids.tolist() for it in batch], [it.sample_id for it in batch], [it.hidden for it in batch])


def online_epoch(S: Setup, epoch: int, steps: int) -> None:
    """The authors' design: every step first runs the k-shot teacher forward (no grad, heads off) on its queries."""
    from stages.models.encode import encode
    from stages.models.heads import attach, detach
    from stages.tasks.prompts import build_prompt, reference_answer
    from stages.tasks.sampler import sample_icds
    t, tc, gb = S.cfg.teacher, S.cfg.task, S.cfg.student.global_batch
    order = np.random.default_rng([S.cfg.student.seed, epoch]).permutation(len(S.queries))
    view = epoch % t.views
    for i in range(steps):
        batch = [S.queries[j] for j in order[i * gb:(i + 1) * gb]]
        prompts = []
        for q in batch:
            ids = sample_icds(S.support_ids, q.id, t.shots, seed=t.seed, view=view)
            prompts.append(build_prompt(S.task.kind, "icl", q, [(S.by_id[c], reference_answer(S.by_id[c], tc.answer)) for c in ids],
                                        answer=reference_answer(q, tc.answer)))
        enc = encode(S.lm, prompts)
        detach(S.lm)  # the teacher is the frozen model without heads
        with torch.no_grad():
            _, hidden_btld = S.engine.module(**enc.inputs)
        attach(S.lm, S.heads)
        targets = [hidden_btld[b, -n:].clone() for b, n in enumerate(enc.span_lens)]
        del hidden_btld
        step(S, enc.span_ids, [q.id for q in batch], targets)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("cached", "online"), required=True)
    ap.add_argument("--shots", type=int, required=True)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--store", default="")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = config(args.store or "/nonexistent", shots=args.shots, num_queries=args.queries)
    S = setup(cfg, with_reader=args.mode == "cached")
    steps = args.queries // cfg.student.global_batch
    times = []
    for epoch in range(args.epochs):
        with Timer() as tm:
            if args.mode == "cached":
                cached_epoch(S, S.reader.epoch(epoch), steps)
            else:
                online_epoch(S, epoch, steps)
        times.append(tm.s)
    emit("student_loop", {"mode": args.mode, "shots": args.shots, "queries": args.queries, "steps_per_epoch": steps,
                          "epoch_s": stats(times[1:] if len(times) > 2 else times), "first_epoch_s": times[0],
                          "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
