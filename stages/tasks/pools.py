"""Which samples are training queries, which form the support set, which are evaluated (METHOD.md §3)."""
from __future__ import annotations

from stages.errors import UserError
from stages.tasks import TaskSpec
from stages.tasks.prompts import reference_answer
from stages.tasks.sample import Sample


def query_split(task_cfg) -> str:
    """The split the teacher's and student's queries come from: task.query_split, else the training split."""
    return task_cfg.query_split or task_cfg.train_split


def icd_pool(support: list[Sample], answer_policy: str) -> tuple[list[str], list[str]]:
    """(ids, reference answers) of the support set, as sample_icds takes them (the cover sampler groups by answer)."""
    return [s.id for s in support], [reference_answer(s, answer_policy) for s in support]


def training_queries(task: TaskSpec, root: str, split: str, num_queries: int) -> list[Sample]:
    """The first N samples of the training split (all when N = 0)."""
    samples = task.load(root, split)
    if num_queries > len(samples):
        raise UserError(f"task.num_queries = {num_queries} but the {split} split of {root} has {len(samples)} samples")
    return samples[:num_queries] if num_queries else samples


def support_set(task: TaskSpec, root: str, split: str, queries: list[Sample], support: str) -> list[Sample]:
    """The ICD pool: the training queries themselves (the authors' setting) or the whole training split."""
    return queries if support == "queries" else task.load(root, split)


def eval_queries(task: TaskSpec, root: str, split: str, num_samples: int, support: list[Sample]) -> list[Sample]:
    samples = task.load(root, split)
    samples = samples[:num_samples] if num_samples else samples
    overlap = {s.id for s in samples} & {s.id for s in support}
    if overlap:
        raise UserError(f"{len(overlap)} evaluation queries of split '{split}' are also in the support set "
                        f"(e.g. id {sorted(overlap)[0]}); evaluate on a split disjoint from the training split")
    return samples
