"""What `pipeline run teacher|student --dry-run` prints: the plan of a stage, loading no model.

The shard arithmetic, the batch split and the DeepSpeed config come from the same functions the
stages run, so a plan cannot drift from what a run does. The query count needs the task data; where
it cannot be read here (an embedded default not built yet, a cluster path), the plan says so and
uses what the config knows.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from stages.dist import LAUNCHER_VARS, rank_and_world
from stages.errors import UserError
from stages.student import batch_split, ds_config, epochs_for
from stages.tasks import get_task
from stages.tasks.pools import query_split, training_queries
from stages.tasks.toy_icl import DEFAULT_N_TRAIN
from stages.teacher import fingerprint_fields, store_dtype
from storage import layout
from storage.errors import StoreError
from storage.inspection import info
from storage.manifest import shard_owner

if TYPE_CHECKING:
    from pipeline.config import Config


def _launcher(explicit: bool = False) -> str:
    if explicit:
        return "--rank/--world-size"
    for rank_var, world_var in LAUNCHER_VARS:
        if rank_var in os.environ and world_var in os.environ:
            return f"{rank_var}/{world_var}"
    return "none (rank 0 of 1)"


def _queries(cfg: "Config") -> tuple[int | None, str]:
    """(number of training queries or None, where the number comes from)."""
    tc = cfg.task
    if not tc.root:
        if tc.num_queries > DEFAULT_N_TRAIN:
            raise UserError(f"task.num_queries = {tc.num_queries} but the embedded set has {DEFAULT_N_TRAIN} training samples")
        n = tc.num_queries or DEFAULT_N_TRAIN
        return n, f"the embedded toy ICL set ({DEFAULT_N_TRAIN} training samples; built on the first real run)"
    try:
        queries = training_queries(get_task(tc.name), tc.root, query_split(tc), tc.num_queries, seed=tc.seed)
        return len(queries), tc.root
    except (UserError, OSError) as e:
        if tc.num_queries:
            return tc.num_queries, f"task.num_queries (the data at {tc.root} is not readable here: {e})"
        return None, f"unknown: the data at {tc.root} is not readable here ({e}) and task.num_queries is 0"


def _store(url: str) -> dict | None:
    """The existing store's summary, or None when there is none yet."""
    try:
        return info(url)
    except (StoreError, OSError):
        return None


def _model(cfg: "Config") -> dict:
    return {"path": cfg.model.path, "family": cfg.model.family, "dtype": cfg.model.dtype}


def teacher_plan(cfg: "Config") -> dict:
    t = cfg.teacher
    rank, world = rank_and_world(t.rank, t.world_size)
    n_queries, data = _queries(cfg)
    store = _store(t.store)
    published = set(range(store["shards_total"])) - set(store["missing_shards"]) if store else set()
    plan = {"stage": "teacher", "rank": rank, "world_size": world, "launcher": _launcher(t.rank >= 0), "model": _model(cfg),
            "data": data, "queries": n_queries, "views": t.views, "shots": t.shots, "batch_size": t.batch_size,
            "shard_size": t.shard_size, "store": t.store, "store_dtype": store_dtype(cfg),
            "store_state": f"{len(published)} of {store['shards_total']} shards published" if store else "new"}
    if n_queries is not None:
        n_shards = math.ceil(n_queries / t.shard_size)
        owners = [shard_owner(s, world) for s in range(n_shards)]
        mine = [s for s in range(n_shards) if owners[s] == rank and s not in published]
        plan |= {"shards": n_shards, "shards_per_rank": {r: owners.count(r) for r in range(world)},
                 "this_rank_writes": mine}
    plan["peak_memory_per_rank"] = _peak_memory(cfg)
    plan["fingerprint_fields"] = fingerprint_fields(cfg, None, get_task(cfg.task.name).kind)
    return plan


def _peak_memory(cfg: "Config") -> dict | str:
    """The teacher's peak memory per rank (stages/memory.py) from the model's config.json; no weights are read."""
    from transformers import AutoConfig

    from stages.memory import TEXT_TOKENS, from_config, teacher_peak
    from stages.models import DTYPES, FAMILIES
    t = cfg.teacher
    try:
        config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        return f"unknown: the model's config.json is not readable here ({str(e).splitlines()[0]})"
    if config.model_type not in FAMILIES:
        return f"unknown: model family '{config.model_type}' is not supported"
    m = from_config(config, cfg.model.dtype)
    span = m.image_tokens + TEXT_TOKENS  # a demonstration is as long as the query + answer span
    stored = store_dtype(cfg)
    settings = dict(batch=t.batch_size, shots=t.shots, demo_tokens=span, span=span, shard_items=t.shard_size * t.views,
                    values_bytes=DTYPES[layout.values_dtype(stored)].itemsize,
                    logits_kept=span if t.logits != "off" else 1, stored_rows=TEXT_TOKENS if t.span == "text" else None,
                    copied=stored != cfg.model.dtype or t.span == "text")
    sdpa, eager = teacher_peak(m, **settings), teacher_peak(m, **settings, attention="eager")
    terms = {k: v for k, v in sdpa.items() if k != "peak_phase"}
    return {k: _size(v) for k, v in terms.items()} | {
        "peak_phase": sdpa["peak_phase"], "total_with_eager_attention": _size(eager["total"]), "bytes": terms,
        "assumes": f"sdpa attention; images of {m.image_px}x{m.image_px} pixels ({m.patches} patches); {span} tokens "
                   f"per demonstration and span ({TEXT_TOKENS} of text); bytes of tensors, which the CUDA allocator "
                   "rounds up and caches (README.md, Teacher memory)"}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def student_plan(cfg: "Config") -> dict:
    s = cfg.student
    rank, world = rank_and_world()
    micro, accumulation = batch_split(s.global_batch, s.micro_batch, world)
    store = _store(cfg.teacher.store)
    # An epoch sees one view of each kept query (view = epoch mod V), so items per epoch = queries.
    if store:
        n_items, items_from = store["items_stored"] // store["views"], "the store (one view per epoch)"
    else:
        n_queries, data = _queries(cfg)
        n_items = n_queries
        items_from = f"queries (no store at {cfg.teacher.store} yet; queries from {data})"
    if s.num_queries and n_items is not None:  # the first N queries (fewer items where some of them were skipped)
        n_items, items_from = min(n_items, s.num_queries), f"{items_from}, its first student.num_queries"
    plan = {"stage": "student", "rank": rank, "world_size": world, "launcher": _launcher(), "model": _model(cfg),
            "store": cfg.teacher.store, "store_fingerprint": store["fingerprint"] if store else None,
            "items": n_items, "items_from": items_from, "out": s.out, "global_batch": s.global_batch,
            "micro_batch_per_rank": micro, "accumulation_steps": accumulation, "zero_stage": s.zero_stage}
    if n_items is not None:
        epochs = epochs_for(s, n_items)
        plan |= {"epochs": epochs, "steps_per_epoch": n_items // s.global_batch,
                 "optimizer_steps": epochs * (n_items // s.global_batch)}
    plan["deepspeed"] = ds_config(s, micro, accumulation, cfg.model.dtype)
    plan["store_must_match"] = fingerprint_fields(cfg, None, get_task(cfg.task.name).kind)
    return plan
