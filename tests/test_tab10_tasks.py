"""The seed's Tab. 10 tasks (Flickr30k, MME, SEED-Bench-2, MMMU-Pro): loaders on the synthetic layouts and
their refusals, the seeded split of the test-only sets, prompts, metrics worked out by hand, and each task
through teacher -> student -> evaluation on the `pipeline` command."""
from __future__ import annotations

import ast
import json
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.errors import UserError
from stages.metrics import choice_scores, mme_scores, parse_letter, parse_yes_no
from stages.tasks import get_task
from stages.tasks.pools import eval_queries, support_set, training_queries
from stages.tasks.prompts import build_prompt
from stages.tasks.sample import Sample

SEED = 3407
MMMU_FILE = os.path.join("standard (10 options)", "test-00000-of-00001.parquet")


def _json(fpath):
    with open(fpath) as f:
        return json.load(f)


def _copy(data_root, sub, tmp_path) -> str:
    shutil.copytree(os.path.join(data_root, sub), tmp_path / sub)
    return str(tmp_path / sub)


# --- loaders read the synthetic layouts ----------------------------------------------------------------------------

def test_flickr30k_reads_the_karpathy_splits(data_root):
    root = os.path.join(data_root, "flickr30k")
    images = _json(os.path.join(root, "dataset_flickr30k.json"))["images"]
    for split in ("train", "val", "test"):
        expected = [im for im in images if im["split"] == split]
        samples = get_task("flickr30k").load(root, split)
        assert [s.id for s in samples] == [im["filename"].removesuffix(".jpg") for im in expected]
        assert [s.answers for s in samples] == [tuple(x["raw"] for x in im["sentences"]) for im in expected]
        assert all(s.image == os.path.join(root, "flickr30k-images", im["filename"]) and s.question is None
                   for s, im in zip(samples, expected))
    assert len(get_task("flickr30k").load(root, "val")) == 12 and get_task("flickr30k").load(root, "test")


def test_mme_reads_both_release_layouts(data_root, tmp_path):
    root = os.path.join(data_root, "mme")
    samples = get_task("mme").load(root, "test")
    txt_files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".txt")]
    assert len(samples) == 2 * len(txt_files) == 2 * 42, "two questions per image, every image of the set"
    by_image = {}
    for s in samples:
        by_image.setdefault(s.image, []).append(s)
        assert os.path.isfile(s.image) and s.question.endswith("Please answer yes or no.")
    assert {tuple(sorted(q.answers[0] for q in qs)) for qs in by_image.values()} == {("No", "Yes")}
    artwork = [s for s in samples if s.category == "artwork"]
    assert artwork and all(os.sep + os.path.join("artwork", "images") + os.sep in s.image for s in artwork)
    color = [s for s in samples if s.category == "color"]
    assert color and all(os.path.dirname(s.image) == os.path.join(root, "color") for s in color)
    with open(os.path.join(root, "color", os.path.basename(color[0].image)[:-4] + ".txt")) as f:
        question, answer = f.readline().rstrip("\n").split("\t")
    assert (color[0].question, color[0].answers) == (question, (answer,))

    # the zip unpacks to MME_Benchmark_release_version/MME_Benchmark/; PNG images are found too
    release = tmp_path / "MME_Benchmark_release_version"
    shutil.copytree(root, release / "MME_Benchmark")
    png = release / "MME_Benchmark" / "color" / os.path.basename(color[0].image)
    Image.open(png).save(png.with_suffix(".png"))
    png.unlink()
    again = get_task("mme").load(str(release), "test")
    assert [s.id for s in again] == [s.id for s in samples]
    assert again[samples.index(color[0])].image == str(png.with_suffix(".png"))


def test_seed_bench_takes_the_single_image_questions(data_root):
    root = os.path.join(data_root, "seed_bench")
    questions = _json(os.path.join(root, "SEED-Bench_v2_level1_2_3.json"))["questions"]
    single = [q for q in questions if q["data_type"] == "Single Image"]
    samples = get_task("seed-bench").load(root, "test")
    assert [s.id for s in samples] == [q["question_id"] for q in single] and len(single) == 42
    assert {q["question_type_id"] for q in questions} - {q["question_type_id"] for q in single} == {17, 19}
    folders = {"cc3m": "cc3m-image", "SEED-Bench v2": "SEED-Bench-2-image"}
    for s, q in zip(samples, single):
        assert s.options == (q["choice_a"], q["choice_b"], q["choice_c"], q["choice_d"])
        assert s.answers == (q["answer"],) and s.question == q["question"]
        assert s.image == os.path.join(root, folders[q["data_source"]], q["data_id"])
    assert {s.category for s in samples} == {"Instance Attributes", "Instance Identity", "Instances Counting"}
    assert samples[1].load_image().size == (32, 32)


def test_mmmu_pro_takes_the_single_image_questions(data_root, tmp_path):
    root = os.path.join(data_root, "mmmu_pro")
    rows = pq.read_table(os.path.join(root, MMMU_FILE)).to_pylist()
    single = [r for r in rows if r["image_2"] is None]
    assert len(rows) - len(single) == 6, "every 8th of 42 questions has a second image"
    for path in (root, os.path.join(root, "standard (10 options)"), os.path.join(root, MMMU_FILE)):
        samples = get_task("mmmu-pro").load(path, "test")
        assert [s.id for s in samples] == [r["id"] for r in single]
    for s, r in zip(samples, single):
        assert s.options == tuple(ast.literal_eval(r["options"])) and len(s.options) == 10
        assert s.answers == (r["answer"],) and s.image == r["image_1"]["bytes"] and s.category == r["subject"]


# --- refusals: one UserError naming the file and what is wrong ------------------------------------------------------

def _edit_json(fpath, change):
    data = _json(fpath)
    change(data)
    with open(fpath, "w") as f:
        json.dump(data, f)


def _rewrite_mmmu(root, change):
    fpath = os.path.join(root, MMMU_FILE)
    pq.write_table(change(pq.read_table(fpath)), fpath)


def _set_column(table, name, values):
    return table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))


FLICKR, MME_DIR, SEED_DIR, MMMU_DIR = "flickr30k", "mme", "seed_bench", "mmmu_pro"
BAD = {
    "flickr30k: no split file": (FLICKR, lambda r: os.remove(os.path.join(r, "dataset_flickr30k.json")),
                                 r"flickr30k Karpathy split file not found: expected .*dataset_flickr30k\.json"),
    "flickr30k: entry without filename": (
        FLICKR, lambda r: _edit_json(os.path.join(r, "dataset_flickr30k.json"),
                                     lambda d: d["images"][0].pop("filename")),
        r"dataset_flickr30k\.json: images\[0\] lacks one of 'filename', 'split'"),
    "flickr30k: not JSON": (FLICKR, lambda r: open(os.path.join(r, "dataset_flickr30k.json"), "w").write("{"),
                            r"dataset_flickr30k\.json is not valid JSON"),
    "mme: subtask missing": (MME_DIR, lambda r: shutil.rmtree(os.path.join(r, "OCR")),
                             r"MME subtask folder not found: expected .*OCR"),
    "mme: answer not Yes/No": (
        MME_DIR, lambda r: open(os.path.join(r, "count", sorted(os.listdir(os.path.join(r, "count")))[1]), "w")
        .write("How many?\tMaybe\n"), r"count/.*\.txt: line 1 is not 'question<TAB>Yes' or 'question<TAB>No'"),
    "mme: image missing": (
        MME_DIR, lambda r: os.remove(os.path.join(r, "scene", "images", sorted(os.listdir(os.path.join(r, "scene",
                                                                                                     "images")))[0])),
        r"scene/questions_answers_YN/.*\.txt: no image .*\.jpg or .*\.png in .*scene/images"),
    "seed-bench: no question file": (SEED_DIR, lambda r: os.remove(os.path.join(r, "SEED-Bench_v2_level1_2_3.json")),
                                     r"SEED-Bench-2 question file not found"),
    "seed-bench: answer E": (
        SEED_DIR, lambda r: _edit_json(os.path.join(r, "SEED-Bench_v2_level1_2_3.json"),
                                       lambda d: d["questions"][0].update(answer="E")),
        r"question 3_0 has answer 'E', expected one of A, B, C, D"),
    "seed-bench: duplicate id": (
        SEED_DIR, lambda r: _edit_json(os.path.join(r, "SEED-Bench_v2_level1_2_3.json"),
                                       lambda d: d["questions"][-1].update(question_id="3_0")),
        r"duplicate question_id 3_0"),
    "mmmu-pro: no options column": (MMMU_DIR, lambda r: _rewrite_mmmu(r, lambda t: t.drop(["options"])),
                                    r"lacks column\(s\): options"),
    "mmmu-pro: options not a list": (
        MMMU_DIR, lambda r: _rewrite_mmmu(r, lambda t: _set_column(t, "options", ["oops"] * t.num_rows)),
        r"id test_Physics_1 has options 'oops'; expected a list of 2 to 10 options"),
    "mmmu-pro: answer past the options": (
        MMMU_DIR, lambda r: _rewrite_mmmu(r, lambda t: _set_column(t, "answer", ["K"] * t.num_rows)),
        r"id test_Physics_1 has answer 'K', expected a letter among its 10 options \(A-J\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_files_are_refused(data_root, tmp_path, case):
    sub, damage, pattern = BAD[case]
    root = _copy(data_root, sub, tmp_path)
    damage(root)
    task = {FLICKR: "flickr30k", MME_DIR: "mme", SEED_DIR: "seed-bench", MMMU_DIR: "mmmu-pro"}[sub]
    with pytest.raises(UserError, match=pattern):
        get_task(task).load(root, "train" if task == "flickr30k" else "test")


# --- the split of a test-only set ----------------------------------------------------------------------------------

def _by_hand_shuffle(samples, seed, by_image):
    """The documented split: shuffle questions (or images, keeping each image's questions in file order)."""
    if not by_image:
        order = list(samples)
        random.Random(seed).shuffle(order)
        return order
    groups = {}
    for s in samples:
        groups.setdefault(s.image, []).append(s)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    return [s for g in order for s in g]


@pytest.mark.parametrize("name, sub", [("seed-bench", "seed_bench"), ("mmmu-pro", "mmmu_pro")])
def test_test_only_set_splits_by_a_seeded_question_shuffle(data_root, name, sub):
    task, root = get_task(name), os.path.join(data_root, sub)
    everything = _by_hand_shuffle(task.load(root, "test"), SEED, by_image=False)
    train = training_queries(task, root, "train", 10, seed=SEED)
    assert train == everything[:10]
    assert support_set(task, root, "train", train, "train") == train, "support=train is the train side"
    assert eval_queries(task, root, "val", 0, train, seed=SEED) == everything[10:]
    assert eval_queries(task, root, "val", 3, train, seed=SEED) == everything[10:13]
    assert training_queries(task, root, "train", 10, seed=SEED + 1) != train


def test_mme_splits_by_image(data_root):
    task, root = get_task("mme"), os.path.join(data_root, "mme")
    everything = _by_hand_shuffle(task.load(root, "test"), SEED, by_image=True)
    train = training_queries(task, root, "train", 8, seed=SEED)
    assert train == everything[:8] and len({s.image for s in train}) == 4
    rest = eval_queries(task, root, "val", 0, train, seed=SEED)
    assert rest == everything[8:]
    # an odd N cuts an image: its other question is neither trained on nor evaluated
    odd = training_queries(task, root, "train", 7, seed=SEED)
    assert eval_queries(task, root, "val", 0, odd, seed=SEED) == everything[8:]


def test_test_only_set_refusals_and_fingerprint(data_root):
    from pipeline.config import load_config
    from stages.teacher import fingerprint_fields
    task, root = get_task("mme"), os.path.join(data_root, "mme")
    with pytest.raises(UserError, match=r"mme has one labelled set of 84 questions: set task.num_queries .* got 0"):
        training_queries(task, root, "train", 0, seed=SEED)
    with pytest.raises(UserError, match=r"set task.num_queries to how many of them train \(1 to 83"):
        training_queries(task, root, "train", 84, seed=SEED)
    with pytest.raises(UserError, match=r"split 'val' holds no training queries"):
        training_queries(task, root, "val", 8, seed=SEED)
    fields = {n: fingerprint_fields(load_config(None, ["task.name=mme", f"task.num_queries={n}"]), None, "yesno")
              for n in (8, 10)}
    assert fields[8]["one_set"] == {"split_by": "image", "num_queries": 8} and fields[8] != fields[10]
    assert fields[8]["task_seed"] == SEED and fields[8]["prompt"]["instruction"].startswith("Instruction: answer")
    assert "one_set" not in fingerprint_fields(load_config(None, ["task.num_queries=8"]), None, "vqa")


# --- prompts -------------------------------------------------------------------------------------------------------

def _text(pieces):
    return "".join(p if isinstance(p, str) else "<img>" for p in pieces)


def test_multiple_choice_and_yes_no_prompts():
    img = Image.new("RGB", (4, 4))
    icd = Sample("1", "a.jpg", "What color?", ("B",), options=("red", "blue", "green", "pink"))
    query = Sample("2", "b.jpg", "What shape?", ("A",), options=("circle", "square", "star", "cube"))
    prompt = build_prompt("choice", "icl", query, [(icd, "B")], load=lambda s: img)
    assert _text(prompt.context) == ("Instruction: choose the correct option and answer with its letter. Use the image "
                                     "to answer.\nImage:<img> Question: What color? Options: A. red B. blue C. green "
                                     "D. pink Answer: B\n")
    assert _text(prompt.query) == ("Image:<img> Question: What shape? Options: A. circle B. square C. star D. cube "
                                   "Answer:")
    ten = Sample("3", "c.jpg", "Pick one.", ("J",), options=tuple("0123456789"))
    assert _text(build_prompt("choice", "zero-shot", ten, [], answer="J", load=lambda s: img).query).endswith(
        "H. 7 I. 8 J. 9 Answer: J")
    yn = build_prompt("yesno", "icl", Sample("4", "d.jpg", "Is it red?", ("No",)),
                      [(Sample("5", "e.jpg", "Is it blue?", ("Yes",)), "Yes")], load=lambda s: img)
    assert _text(yn.context) == ("Instruction: answer the question with yes or no. Use the image to answer.\n"
                                 "Image:<img> Question: Is it blue? Answer: Yes\n")
    assert _text(yn.query) == "Image:<img> Question: Is it red? Answer:"


# --- metrics, worked out by hand -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, n_options, expected", [
    ("B", 4, "B"), ("(B)", 4, "B"), ("B.", 4, "B"), ("The answer is B", 4, "B"), ("the answer is c.", 4, "C"),
    ("b", 4, "B"), ("(d) a cube", 4, "D"), ("B. a red apple", 4, "B"), ("Answer: D", 4, "D"), ("option a", 4, "A"),
    ("A", 4, "A"), ("A man on a horse", 4, None), ("a dog", 4, None), ("The answer is a man", 4, None),
    ("I do not know", 4, None), ("", 4, None), ("J", 10, "J"), ("(J) 42", 10, "J"), ("E", 10, "E"),
    ("J", 4, None), ("E.", 4, None),
])
def test_letter_parsing(text, n_options, expected):
    assert parse_letter(text, n_options) == expected


def _q(sid, answer, image="i", category="", options=("x", "y", "z", "w")):
    return Sample(sid, image, "q?", (answer,), options=options, category=category)


def test_multiple_choice_accuracy_counts_unparsed_as_wrong_unless_told():
    queries = [_q("1", "B", category="a"), _q("2", "C", category="a"), _q("3", "A", category="b")]
    predictions = {"1": "(B)", "2": "D", "3": "A man on a horse"}
    scores = choice_scores(predictions, queries)
    assert scores["accuracy"] == pytest.approx(100 / 3) and scores["unparsed"] == 1
    assert scores["accuracy_by_category"] == pytest.approx({"a": 50.0, "b": 0.0})
    # random: each unparsed query gets a seeded letter among its options (two here, so about half are right)
    many = [_q(str(i), "A", options=("x", "y")) for i in range(200)]
    silent = {q.id: "no idea" for q in many}
    assert choice_scores(silent, many)["accuracy"] == 0.0
    drawn = choice_scores(silent, many, unparsed="random", seed=1)["accuracy"]
    assert 35.0 < drawn < 65.0 and drawn == choice_scores(silent, many, unparsed="random", seed=1)["accuracy"]
    assert drawn != choice_scores(silent, many, unparsed="random", seed=2)["accuracy"]


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("nope", "no"),
    ("There is no dog", "other"), ("", "other"), ("maybe yes", "other"),
])
def test_yes_no_parsing_follows_the_official_rule(text, expected):
    assert parse_yes_no(text) == expected


def test_mme_score_acc_plus_by_hand():
    queries = [_q("e1a", "Yes", "img1", "existence"), _q("e1b", "No", "img1", "existence"),   # both right
               _q("e2a", "Yes", "img2", "existence"), _q("e2b", "No", "img2", "existence"),   # one right
               _q("c3a", "Yes", "img3", "code_reasoning"), _q("c3b", "No", "img3", "code_reasoning")]  # one right
    predictions = {"e1a": "Yes", "e1b": "No", "e2a": "yes.", "e2b": "Yes", "c3a": "Yes, it is", "c3b": "maybe"}
    scores = mme_scores(predictions, queries)
    # existence: acc 3/4 = 75, acc+ 1/2 images = 50 -> 125; code_reasoning: acc 1/2 = 50, acc+ 0/1 = 0 -> 50
    assert scores["subtasks"] == {"existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
                                  "code_reasoning": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}}
    assert (scores["perception"], scores["cognition"]) == (125.0, 50.0)
    assert scores["accuracy"] == pytest.approx(100 * 4 / 6)


# --- each task through teacher -> student -> evaluation, on the command ---------------------------------------------

E2E = {"flickr30k": ("flickr30k", "cider", {"cider"}),
       "mme": ("mme", "accuracy", {"accuracy", "perception", "cognition", "subtasks"}),
       "seed-bench": ("seed_bench", "accuracy", {"accuracy", "unparsed", "accuracy_by_category"}),
       "mmmu-pro": ("mmmu_pro", "accuracy", {"accuracy", "unparsed", "accuracy_by_category"})}


@pytest.mark.parametrize("name", E2E)
def test_each_task_runs_teacher_student_and_evaluation(pipeline, model_dirs, data_root, tmp_path, name):
    from storage.reader import open_manifest
    sub, headline, keys = E2E[name]
    runs = tmp_path / "runs"
    code, out, err = pipeline("run", "all", "--shots", 2, "--set", f"model.path={model_dirs['idefics2']}",
                              "--set", f"task.name={name}", "--set", f"task.root={os.path.join(data_root, sub)}",
                              "--set", "task.num_queries=4", "--set", "student.epochs=1", "--set", "eval.num_samples=2",
                              "--set", "eval.num_beams=1", "--set", f"run_dir={runs}")
    assert code == 0, err[-3000:]
    metrics = {mode: _json(runs / f"eval-{mode}-{name}" / "metrics.json")
               for mode in ("zero-shot", "icl-2shot", "mimic")}
    assert all(keys <= m.keys() and m["n"] == 2 and m["task"] == name for m in metrics.values())
    assert out.splitlines()[-1] == (
        f"{headline} on 2 {name} queries: zero-shot {metrics['zero-shot'][headline]:.1f}, "
        f"2-shot ICL {metrics['icl-2shot'][headline]:.1f}, MimIC {metrics['mimic'][headline]:.1f}")
    manifest = open_manifest(str(runs / f"store-{name}-2shot"))
    assert len(manifest.query_ids) == 4
    with open(runs / f"eval-mimic-{name}" / "predictions.jsonl") as f:
        evaluated = [json.loads(line)["id"] for line in f]
    assert len(evaluated) == 2 and not set(evaluated) & set(manifest.query_ids)
    if name == "mme":  # split by image: no evaluated question shows a training image
        assert manifest.fingerprint_fields["one_set"] == {"split_by": "image", "num_queries": 4}
        image_of = lambda sid: sid.rsplit("/", 1)[0]  # noqa: E731  ids are subtask/stem/line
        assert not {image_of(i) for i in evaluated} & {image_of(i) for i in manifest.query_ids}
