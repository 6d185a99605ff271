"""What every benchmark shares: the model and data it runs on, the config, the stage loops' pieces, statistics.

The loops here are copies of the stages' loops (stages/teacher.py, stages/student.py) built from the
same project functions (encode, SpanCapture, Item/open_for_write, TargetReader, Student, losses), so
that a bare forward or an in-RAM batch can be timed next to the real thing without a hook in the stage.
"""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

# The benchmark model (BENCHMARKS.md states it): a random Idefics2 whose Mistral decoder has hidden 512,
# 8 layers, 4 heads (2 KV), MLP 1024; about 19 M decoder parameters, so one k-shot forward is matrix
# products, not Python.
HIDDEN, LAYERS = 512, 8
N_TRAIN = 64  # synthetic training samples: queries and ICD pool (support = queries, as the authors)


def work_dpath() -> str:
    return os.environ.get("BENCH_WORK", "/tmp/mimic-bench")


def set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op
        pass


def assets() -> tuple[str, str]:
    """(model directory, data root), built once under the work directory."""
    from stages.models.tiny import make_model
    from stages.tasks.synthetic import write_synthetic
    model_dpath = os.path.join(work_dpath(), f"idefics2-h{HIDDEN}-l{LAYERS}")
    data_root = os.path.join(work_dpath(), "data")
    if not os.path.isfile(os.path.join(model_dpath, "model.safetensors")):
        make_model("idefics2", model_dpath, seed=0, hidden=HIDDEN, layers=LAYERS)
    write_synthetic(data_root, n_train=N_TRAIN, n_val=8, seed=0)
    return model_dpath, data_root


def config(store: str, *, shots: int, num_queries: int, shard_size: int = 8, batch_size: int = 4,
           global_batch: int = 4, micro_batch: int = 4, dtype: str = "float32", extra: tuple[str, ...] = ()):
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    model_dpath, data_root = assets()
    sets = [f"model.path={model_dpath}", f"task.root={data_root}", f"teacher.store={store}",
            f"run_dir={work_dpath()}/runs", f"teacher.shots={shots}", f"task.num_queries={num_queries}",
            f"teacher.shard_size={shard_size}", f"teacher.batch_size={batch_size}", f"model.dtype={dtype}",
            f"student.global_batch={global_batch}", f"student.micro_batch={micro_batch}",
            "task.support=train", *extra]  # ICD pool = the whole synthetic split, so k = 32 fits any N
    return resolve(load_config(None, sets))


def stats(xs: list[float]) -> dict:
    """Median, min, max and relative spread (max - min) / median of repeated measurements."""
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs), "spread": (max(xs) - min(xs)) / med if med else 0.0,
            "n": len(xs), "values": xs}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def emit(name: str, result: dict) -> None:
    """Print one JSON line that run_all picks up (the last line of the child's stdout)."""
    print(json.dumps({"bench": name, **result}), flush=True)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


# -- the teacher's loop, in pieces ---------------------------------------------------------------
@dataclasses.dataclass
class TeacherBatch:
    shard: int
    jobs: list          # [(query, view)]
    icd_ids: list       # per row, ICD ids
    enc: object         # stages.models.encode.Encoded
    prompts: list = dataclasses.field(default_factory=list)  # the prompts `enc` was encoded from


def teacher_batches(cfg, lm, manifest=None) -> list[TeacherBatch]:
    """The teacher's batches, shard by shard, exactly as stages/teacher.py builds them (sampler, prompts, encode)."""
    from stages.models.encode import encode
    from stages.tasks import get_task
    from stages.tasks.pools import icd_pool, query_split, same_picture, support_set, training_queries
    from stages.tasks.prompts import build_prompt, reference_answer
    from stages.tasks.sampler import sample_icds
    t, tc = cfg.teacher, cfg.task
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, query_split(tc), tc.num_queries, seed=tc.seed)
    support = support_set(task, tc.root, tc.train_split, queries, tc.support)
    by_id = {s.id: s for s in support} | {q.id: q for q in queries}
    support_ids, support_answers = icd_pool(support, tc.answer)
    same_picture_ids = same_picture(support, t.exclude_same_image)
    images = {}

    def load(s):
        if s.id not in images:
            images[s.id] = by_id[s.id].load_image()
        return images[s.id]
    out = []
    n_shards = -(-len(queries) // t.shard_size)
    for shard in range(n_shards):
        lo, hi = shard * t.shard_size, min(len(queries), (shard + 1) * t.shard_size)
        jobs = [(q, v) for q in queries[lo:hi] for v in range(t.views)]
        for b0 in range(0, len(jobs), t.batch_size):
            batch = jobs[b0: b0 + t.batch_size]
            icd_ids = [sample_icds(support_ids, q.id, t.shots, seed=t.seed, view=v, sampler=t.sampler,
                                   answers=support_answers, exclude=same_picture_ids(q)) for q, v in batch]
            prompts = [build_prompt(task.kind, "icl", q, [(by_id[i], reference_answer(by_id[i], tc.answer)) for i in ids],
                                    answer=reference_answer(q, tc.answer), load=load)
                       for (q, _), ids in zip(batch, icd_ids)]
            out.append(TeacherBatch(shard, batch, icd_ids, encode(lm, prompts), prompts))
    return out


def teacher_manifest(cfg, lm):
    from stages.tasks import get_task
    from stages.tasks.pools import query_split, training_queries
    from stages.teacher import fingerprint_fields, store_dtype
    from storage.manifest import Manifest, format_version
    t, tc = cfg.teacher, cfg.task
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, query_split(tc), tc.num_queries, seed=tc.seed)
    dims = lm.dims
    return Manifest(format_version(store_dtype(cfg)), fingerprint_fields(cfg, lm, task.kind), tuple(q.id for q in queries),
                    t.views, t.shard_size, dims.n_layers, dims.d_model, store_dtype(cfg))


def prompt_tokens(batches: list[TeacherBatch]) -> int:
    return sum(int(b.enc.inputs["attention_mask"].sum()) for b in batches)
