"""Which samples are training queries, which form the support set, which are evaluated (METHOD.md §3)."""
from __future__ import annotations

import random
from collections.abc import Callable

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


def shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    """The samples in task.seed's order: the same in every process, on every machine.

    Official VQAv2 files list a picture's questions together, so the first N in file order would
    cover about N/5 pictures; the authors shuffle with a fixed seed (3407) before taking N.
    """
    order = list(samples)
    random.Random(seed).shuffle(order)  # seeded by an int, never by hash(): no PYTHONHASHSEED dependence
    return order


def one_set(task: TaskSpec, root: str, seed: int) -> list[Sample]:
    """A task without a training split (task.split_by): its labelled set shuffled by `seed`; split by image,
    each image's questions stay together (in file order), so that any prefix takes whole images but its last."""
    samples = task.load(root, "test")
    if task.split_by == "question":
        return shuffled(samples, seed)
    by_image: dict[str | bytes, list[Sample]] = {}
    for s in samples:
        by_image.setdefault(s.image, []).append(s)
    return [s for group in shuffled(list(by_image.values()), seed) for s in group]


def _one_set_training(task: TaskSpec, root: str, split: str, num_queries: int, seed: int) -> list[Sample]:
    """The first N of one_set: the authors' split of a test-only benchmark (the rest is evaluated)."""
    if split != "train":
        raise UserError(f"{task.name} has one labelled set, split into train (its first task.num_queries after a "
                        f"shuffle by task.seed) and val (the rest); split {split!r} holds no training queries")
    samples = one_set(task, root, seed)
    if not 0 < num_queries < len(samples):
        raise UserError(f"{task.name} has one labelled set of {len(samples)} questions: set task.num_queries to how "
                        f"many of them train (1 to {len(samples) - 1}; the rest are evaluated), got {num_queries}")
    return samples[:num_queries]


def training_queries(task: TaskSpec, root: str, split: str, num_queries: int, *, seed: int) -> list[Sample]:
    """The first N samples of the split shuffled by `seed` (all of them, shuffled, when N = 0).
    A task without a training split: the first N of its one labelled set (one_set)."""
    if task.split_by:
        return _one_set_training(task, root, split, num_queries, seed)
    samples = task.load(root, split)
    if num_queries > len(samples):
        raise UserError(f"task.num_queries = {num_queries} but the {split} split of {root} has {len(samples)} samples")
    samples = shuffled(samples, seed)
    return samples[:num_queries] if num_queries else samples


def support_set(task: TaskSpec, root: str, split: str, queries: list[Sample], support: str) -> list[Sample]:
    """The ICD pool: the training queries themselves (the authors' setting) or the whole training split
    (for a task without one, its train side is the training queries)."""
    return queries if support == "queries" or task.split_by else task.load(root, split)


def same_picture(support: list[Sample], exclude: bool) -> Callable[[Sample], frozenset[str]]:
    """query -> the ids of the support samples that show the query's picture (teacher/eval.exclude_same_image);
    with exclude False, no id at all (only the query itself is left out, as the authors).

    A picture is a sample's image reference: its file path, or the encoded bytes of HF data.
    """
    if not exclude:
        return lambda query: frozenset()
    by_image: dict[str | bytes, set[str]] = {}
    for s in support:
        by_image.setdefault(s.image, set()).add(s.id)
    frozen = {image: frozenset(ids) for image, ids in by_image.items()}
    return lambda query: frozen.get(query.image, frozenset())


def eval_queries(task: TaskSpec, root: str, split: str, num_samples: int, support: list[Sample], *,
                 seed: int) -> list[Sample]:
    """The first num_samples of the split shuffled by `seed` (all, shuffled, when 0); none may be in the support set.

    A task without a training split (task.split_by): the rest of its one labelled set after the support set
    (the training queries), and, split by image, without the images the support set shows.
    """
    if task.split_by:
        return _one_set_rest(task, root, split, num_samples, support, seed)
    samples = shuffled(task.load(root, split), seed)
    samples = samples[:num_samples] if num_samples else samples
    overlap = {s.id for s in samples} & {s.id for s in support}
    if overlap:
        raise UserError(f"{len(overlap)} evaluation queries of split '{split}' are also in the support set "
                        f"(e.g. id {sorted(overlap)[0]}); evaluate on a split disjoint from the training split")
    return samples


def _one_set_rest(task: TaskSpec, root: str, split: str, num_samples: int, support: list[Sample],
                  seed: int) -> list[Sample]:
    if split != "val":
        raise UserError(f"{task.name} has one labelled set: its evaluation queries are split 'val' (the questions "
                        f"after the first task.num_queries), not {split!r}")
    taken_ids = {s.id for s in support}
    taken_images = {s.image for s in support} if task.split_by == "image" else set()
    rest = [s for s in one_set(task, root, seed) if s.id not in taken_ids and s.image not in taken_images]
    return rest[:num_samples] if num_samples else rest
