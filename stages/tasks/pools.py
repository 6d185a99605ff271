"""Which samples are training queries, which form the support set, which are evaluated (METHOD.md §3)."""
from __future__ import annotations

from stages.errors import UserError
from stages.tasks import TaskSpec
from stages.tasks.sample import Sample


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
