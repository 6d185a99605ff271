"""Which queries are drawn (issue 14, §1): a seeded shuffle, not file order; and, as an option, no
demonstration that shows the query's own picture.

The data set here is written like the official VQAv2 files: each picture's questions stand together,
so the first N in file order would cover only about N/4 pictures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.defaults import resolve
from stages.errors import UserError
from stages.tasks import get_task
from stages.tasks.pools import eval_queries, same_picture, training_queries
from stages.tasks.sample import Sample
from stages.tasks.sampler import sample_icds
from tests.conftest import random_image

TASK = get_task("vqav2")
# picture -> number of its questions; picture 1 has more than the others (the worst query for the shots check)
TRAIN_PICTURES = {1: 6, **{p: 4 for p in range(2, 9)}}  # 34 questions
VAL_PICTURES = {p: 3 for p in range(101, 105)}  # 12 questions


def _write_split(root: str, split: str, pictures: dict[int, int]) -> None:
    questions, annotations = [], []
    for image_id, n in pictures.items():
        random_image(image_id).save(os.path.join(root, f"{split}2014", f"COCO_{split}2014_{image_id:012d}.jpg"))
        for j in range(n):
            qid = image_id * 1000 + j
            questions.append({"image_id": image_id, "question": f"What is thing {j}?", "question_id": qid})
            answer = ("red", "blue", "green", "round", "two")[(image_id + j) % 5]
            annotations.append({"question_id": qid, "image_id": image_id,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i in range(10)]})
    with open(os.path.join(root, f"v2_OpenEnded_mscoco_{split}2014_questions.json"), "w") as f:
        json.dump({"questions": questions}, f)
    with open(os.path.join(root, f"v2_mscoco_{split}2014_annotations.json"), "w") as f:
        json.dump({"annotations": annotations}, f)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pictures")
    for split, pictures in (("train", TRAIN_PICTURES), ("val", VAL_PICTURES)):
        os.mkdir(root / f"{split}2014")
        _write_split(str(root), split, pictures)
    return str(root)


def _file_order(root: str, split: str) -> list[str]:
    with open(os.path.join(root, f"v2_OpenEnded_mscoco_{split}2014_questions.json")) as f:
        return [str(q["question_id"]) for q in json.load(f)["questions"]]


def _picture(qid: str) -> int:
    return int(qid) // 1000  # question ids are image_id * 1000 + j, as written above


# --- the seeded shuffle -----------------------------------------------------------------------------------------

def test_training_queries_are_a_seeded_shuffle_not_the_first_n(root):
    file_order = _file_order(root, "train")
    ids = [q.id for q in training_queries(TASK, root, "train", 8, seed=3407)]
    assert ids != file_order[:8] and len(set(ids)) == 8 and set(ids) <= set(file_order)
    assert len({_picture(i) for i in ids}) > len({_picture(i) for i in file_order[:8]}), \
        "the queries should spread over more pictures than the first 8 in file order (2 pictures)"
    assert ids == [q.id for q in training_queries(TASK, root, "train", 8, seed=3407)]
    assert ids != [q.id for q in training_queries(TASK, root, "train", 8, seed=1)]
    everything = [q.id for q in training_queries(TASK, root, "train", 0, seed=3407)]
    assert sorted(everything) == sorted(file_order) and everything[:8] == ids  # N = 0: all, in the same order


def test_eval_queries_are_a_seeded_shuffle_not_the_first_n(root):
    file_order = _file_order(root, "val")
    ids = [q.id for q in eval_queries(TASK, root, "val", 5, [], seed=3407)]
    assert ids != file_order[:5] and len(set(ids)) == 5 and set(ids) <= set(file_order)
    assert ids == [q.id for q in eval_queries(TASK, root, "val", 5, [], seed=3407)]
    assert ids != [q.id for q in eval_queries(TASK, root, "val", 5, [], seed=1)]


def test_query_order_is_the_same_in_every_process(root):
    """Two interpreters with different string-hash seeds draw the same lists as this one."""
    script = ("import sys; from stages.tasks import get_task; from stages.tasks.pools import eval_queries, "
              "training_queries; t = get_task('vqav2'); "
              "print(*[q.id for q in training_queries(t, sys.argv[1], 'train', 10, seed=3407)]); "
              "print(*[q.id for q in eval_queries(t, sys.argv[1], 'val', 6, [], seed=3407)])")
    expected = " ".join(q.id for q in training_queries(TASK, root, "train", 10, seed=3407)) + "\n" + \
        " ".join(q.id for q in eval_queries(TASK, root, "val", 6, [], seed=3407)) + "\n"
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed},
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected, f"PYTHONHASHSEED={hash_seed} drew other queries"


def test_fingerprint_records_the_task_seed_and_the_exclusion_when_on():
    from stages.teacher import fingerprint_fields
    default = fingerprint_fields(load_config(None, []), None, "vqa")
    assert default["task_seed"] == 3407
    assert fingerprint_fields(load_config(None, ["task.seed=1"]), None, "vqa") == {**default, "task_seed": 1}
    assert "exclude_same_image" not in default  # off (the default) leaves the fingerprint as it was
    on = fingerprint_fields(load_config(None, ["teacher.exclude_same_image=true"]), None, "vqa")
    assert on == {**default, "exclude_same_image": True}
    with pytest.raises(UserError, match="task.seed"):
        load_config(None, ["task.seed=-1"])


# --- demonstrations that show the query's picture ---------------------------------------------------------------

@st.composite
def pictures_and_query(draw):
    """Support samples on a few pictures (several questions each) and a query in it or outside it."""
    n = draw(st.integers(1, 24))
    pictures = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    support = [Sample(f"s{i}", f"/img/{p}.jpg", "q?", ("a",)) for i, p in enumerate(pictures)]
    if draw(st.booleans()):
        query = draw(st.sampled_from(support))
    else:
        query = Sample("outside", f"/img/{draw(st.integers(0, 6))}.jpg", "q?", ("a",))
    return support, query


@settings(max_examples=150, deadline=None)
@given(pictures_and_query(), st.sampled_from(["uniform", "cover"]), st.integers(0, 3), st.data())
def test_exclusion_leaves_out_exactly_the_querys_picture(sq, sampler, seed, data):
    support, query = sq
    ids, answers = [s.id for s in support], [str(int(s.id[1:]) % 3) for s in support]
    allowed = [s.id for s in support if s.image != query.image]  # by hand: everything on another picture
    n_same = sum(s.image == query.image and s.id != query.id for s in support)
    exclude = same_picture(support, True)(query)
    k = data.draw(st.integers(0, len(allowed)))
    picks = sample_icds(ids, query.id, k, seed=seed, view=0, sampler=sampler, answers=answers, exclude=exclude)
    assert len(picks) == k == len(set(picks)) and set(picks) <= set(allowed)
    everything = sample_icds(ids, query.id, len(allowed), seed=seed, view=0, sampler=sampler, answers=answers,
                             exclude=exclude)
    assert sorted(everything) == sorted(allowed)  # nothing else is left out
    with pytest.raises(UserError) as e:
        sample_icds(ids, query.id, len(allowed) + 1, seed=seed, view=0, sampler=sampler, answers=answers,
                    exclude=exclude)
    assert f"offers {len(allowed)} besides the query" in str(e.value)
    assert (f"and the {n_same} other sample(s) that show its picture" in str(e.value)) == (n_same > 0), str(e.value)


def test_without_exclusion_the_draws_are_those_of_before():
    """Pinned: the draws of the sampler before exclude_same_image existed (commit 00a163c)."""
    ids = [f"q{i}" for i in range(12)]
    answers = ["red", "blue", "red", "green", "blue", "red", "pink", "blue", "green", "red", "white", "red"]
    before = {("q3", 5, 0, 0): (["q0", "q10", "q2", "q8", "q1"], ["q11", "q10", "q6", "q8", "q1"]),
              ("q7", 11, 3, 1): (["q3", "q9", "q10", "q11", "q4", "q0", "q5", "q6", "q8", "q1", "q2"],
                                 ["q6", "q1", "q9", "q10", "q8", "q4", "q11", "q3", "q2", "q5", "q0"]),
              ("x", 4, 3407, 2): (["q3", "q10", "q7", "q8"], ["q10", "q1", "q6", "q11"])}
    for (query, k, seed, view), (uniform, cover) in before.items():
        assert sample_icds(ids, query, k, seed=seed, view=view) == uniform
        assert sample_icds(ids, query, k, seed=seed, view=view, sampler="cover", answers=answers) == cover
    support = [Sample(i, f"/img/{int(i[1:]) // 3}.jpg", "q?", ("a",)) for i in ids]  # 3 questions a picture
    assert same_picture(support, False)(support[0]) == frozenset()


# --- through the teacher and the student ------------------------------------------------------------------------

def _config(model_dpath, root, tmp_path, *overrides):
    return resolve(load_config(None, [f"model.path={model_dpath}", f"task.root={root}", f"run_dir={tmp_path}",
                                      "teacher.shard_size=4", "teacher.batch_size=4", *overrides]))


@pytest.fixture(scope="module")
def store(model_dirs, root, tmp_path_factory):
    """A 4-shot store of 16 queries whose demonstrations never show the query's picture."""
    from stages import teacher
    tmp = tmp_path_factory.mktemp("store")
    cfg = _config(model_dirs["idefics2"], root, tmp, "task.num_queries=16", "teacher.shots=4",
                  "teacher.exclude_same_image=true", f"teacher.store={tmp}/store")
    return teacher.run(cfg), tmp


def test_teacher_demonstrations_never_show_the_querys_picture(store, root):
    from storage.reader import open_manifest, read_items
    url, _ = store
    manifest = open_manifest(url)
    assert manifest.fingerprint_fields["exclude_same_image"] is True
    assert manifest.fingerprint_fields["task_seed"] == 3407
    pool = set(manifest.query_ids)
    assert list(manifest.query_ids) != _file_order(root, "train")[:16]
    mates = [q for q in pool if any(_picture(o) == _picture(q) for o in pool - {q})]
    assert mates, "the pool should hold several questions of one picture, or the test shows nothing"
    items = list(read_items(url))
    assert len(items) == 16
    for it in items:
        assert len(it.icd_ids) == 4 and set(it.icd_ids) <= pool - {it.sample_id}
        assert all(_picture(i) != _picture(it.sample_id) for i in it.icd_ids), (it.sample_id, it.icd_ids)


def test_teacher_refuses_too_many_shots_for_the_worst_query_before_loading(root, tmp_path):
    """All 34 questions are queries and support: a query on picture 1 (6 questions) keeps 28
    demonstrations, any other 30. 29 shots are refused, with the right count, before the model loads."""
    from stages import teacher
    queries = training_queries(TASK, root, "train", 0, seed=3407)
    assert _picture(queries[0].id) != 1, "premise: the first query is not the worst one"
    cfg = _config(str(tmp_path / "no-model-here"), root, tmp_path, "teacher.shots=29",
                  "teacher.exclude_same_image=true")
    with pytest.raises(UserError, match=r"offers 28 besides the query and the 5 other sample\(s\)"):
        teacher.run(cfg)


def test_student_takes_the_exclusion_from_the_store(store, model_dirs, root):
    from pipeline.defaults import follow_store
    url, tmp = store
    cfg = load_config(None, [f"model.path={model_dirs['idefics2']}", f"task.root={root}", f"run_dir={tmp}",
                             "task.num_queries=16", f"teacher.store={url}"])
    assert follow_store(cfg, frozenset()).teacher.exclude_same_image is True


def test_student_refuses_a_store_made_with_another_task_seed(store, model_dirs, root):
    from stages import student
    url, tmp = store
    cfg = _config(model_dirs["idefics2"], root, tmp, "task.num_queries=16", "teacher.shots=4",
                  "teacher.exclude_same_image=true", f"teacher.store={url}", "task.seed=1",
                  f"student.out={tmp}/student")
    with pytest.raises(Exception, match="task_seed: store has 3407, config has 1"):
        student.run(cfg)
    assert not os.path.exists(os.path.join(tmp, "student", "heads"))
