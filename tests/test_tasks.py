"""Task loaders against the synthetic data (which is written in the official formats), and their refusals."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.errors import UserError
from stages.tasks import TASKS, get_task
from stages.tasks.coco import load_coco_captions
from stages.tasks.hf import load_hf
from stages.tasks.synthetic import write_synthetic
from stages.tasks.vqa import load_vqa

N_TRAIN, N_VAL = 64, 32  # the defaults, so the timing test measures what the embedded default writes
VQA_FILES = {"vqav2": ("v2_OpenEnded_mscoco_{}2014_questions.json", "v2_mscoco_{}2014_annotations.json"),
             "okvqa": ("OpenEnded_mscoco_{}2014_questions.json", "mscoco_{}2014_annotations.json")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "synth")
    write_synthetic(root)
    return root


def _json(path):
    with open(path) as f:
        return json.load(f)


def _files(root) -> dict[str, bytes]:
    out = {}
    for dpath, _, names in os.walk(root):
        for name in names:
            fpath = os.path.join(dpath, name)
            with open(fpath, "rb") as f:
                out[os.path.relpath(fpath, root)] = f.read()
    return out


# --- loaders read the synthetic data -------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["vqav2", "okvqa"])
def test_vqa_loads_official_files(synth, flavour):
    by_split = {split: load_vqa(synth, split, flavour) for split in ("train", "val")}
    assert [len(by_split["train"]), len(by_split["val"])] == [N_TRAIN, N_VAL]
    all_ids = [s.id for samples in by_split.values() for s in samples]
    assert len(set(all_ids)) == len(all_ids), "question ids must be unique across train and val"
    for split, samples in by_split.items():
        questions = _json(os.path.join(synth, VQA_FILES[flavour][0].format(split)))["questions"]
        annotations = _json(os.path.join(synth, VQA_FILES[flavour][1].format(split)))["annotations"]
        assert [s.id for s in samples] == [str(q["question_id"]) for q in questions]  # questions-file order
        expected = {a["question_id"]: tuple(x["answer"] for x in a["answers"]) for a in annotations}
        for s, q in zip(samples, questions):
            assert s.answers == expected[q["question_id"]] and len(s.answers) == 10
            assert s.question == q["question"]
            assert s.image == os.path.join(synth, f"{split}2014", f"COCO_{split}2014_{q['image_id']:012d}.jpg")
        assert samples[0].load_image().size == (32, 32)


def test_vqa_official_schema_and_realistic_disagreement(synth):
    questions = _json(os.path.join(synth, "v2_OpenEnded_mscoco_val2014_questions.json"))
    assert set(questions) == {"info", "task_type", "data_type", "data_subtype", "questions", "license"}
    assert set(questions["questions"][0]) == {"image_id", "question", "question_id"}
    annotation = _json(os.path.join(synth, "v2_mscoco_val2014_annotations.json"))["annotations"][0]
    assert set(annotation) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
                               "answers"}
    assert set(annotation["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
    samples = load_vqa(synth, "train", "vqav2") + load_vqa(synth, "val", "vqav2")
    agreeing = [Counter(s.answers).most_common(1)[0][1] for s in samples]
    assert min(agreeing) >= 7, "the true answer must stay the clear majority"
    assert sum(n < 10 for n in agreeing) > len(samples) // 2, "most questions should show some disagreement"
    assert len({s.question.split()[0] for s in samples}) >= 3, "several question templates"


def test_images_are_never_uniform(synth):
    for s in load_vqa(synth, "val", "vqav2")[:16]:
        pixels = np.asarray(s.load_image(), np.float32)
        assert pixels.std() > 10, f"{s.image} is nearly uniform"


def test_coco_karpathy_splits(synth):
    karpathy = _json(os.path.join(synth, "dataset_coco.json"))["images"]
    labels = Counter(im["split"] for im in karpathy)
    train, val, test = (load_coco_captions(synth, split) for split in ("train", "val", "test"))
    assert len(train) == labels["train"] + labels["restval"] == N_TRAIN + N_VAL // 4  # train includes restval
    assert (len(val), len(test)) == (N_VAL, N_VAL // 4)
    expected = {str(im["cocoid"]): tuple(x["raw"] for x in im["sentences"]) for im in karpathy}
    for s in train + val + test:
        assert s.question is None and s.answers == expected[s.id] and len(s.answers) == 5
    assert val[0].load_image().size == (32, 32)
    assert load_coco_captions(synth, "val")[0].image.startswith(os.path.join(synth, "val2014", "COCO_val2014_"))


def test_hf_save_to_disk_matches_official_files(synth):
    for split, hf_split in (("train", "train"), ("val", "validation"), ("val", "val")):
        official = load_vqa(synth, split, "vqav2")
        hf = load_hf(os.path.join(synth, "hf", "vqa"), hf_split)
        assert [(s.id, s.question, s.answers) for s in hf] == [(s.id, s.question, s.answers) for s in official]
        with open(official[0].image, "rb") as f:
            assert hf[0].image == f.read(), "the HF copy keeps the encoded JPEG bytes"
    captions = load_hf(os.path.join(synth, "hf", "captions"), "train")
    assert [(s.id, s.answers) for s in captions] == [(s.id, s.answers) for s in load_coco_captions(synth, "train")]
    assert captions[0].question is None and captions[0].load_image().size == (32, 32)


def test_hf_parquet_single_file_and_hub_layout(synth, tmp_path):
    import datasets

    dd = datasets.load_from_disk(os.path.join(synth, "hf", "vqa"))
    expected = load_hf(os.path.join(synth, "hf", "vqa"), "val")
    dd["validation"].to_parquet(str(tmp_path / "val.parquet"))
    assert load_hf(str(tmp_path / "val.parquet"), "val") == expected
    hub = tmp_path / "hub" / "data"  # the hub's layout: data/{split}-00000-of-00001.parquet
    hub.mkdir(parents=True)
    for name, ds in dd.items():
        ds.to_parquet(str(hub / f"{name}-00000-of-00001.parquet"))
    assert load_hf(str(tmp_path / "hub"), "val") == expected
    assert len(load_hf(str(hub), "train")) == N_TRAIN
    with pytest.raises(UserError, match=r"no parquet files of split 'test'; it has: train, validation"):
        load_hf(str(hub), "test")
    shards = tmp_path / "shards"  # a plain directory of parquet files is one split, read in name order
    shards.mkdir()
    dd["validation"].select(range(10)).to_parquet(str(shards / "part-0.parquet"))
    dd["validation"].select(range(10, N_VAL)).to_parquet(str(shards / "part-1.parquet"))
    assert load_hf(str(shards), "val") == expected
    dd["validation"].save_to_disk(str(tmp_path / "dirs" / "val"))  # one save_to_disk Dataset per split directory
    assert load_hf(str(tmp_path / "dirs"), "val") == expected


def test_hf_plain_pyarrow_parquet_with_relative_paths(synth, tmp_path):
    shutil.copytree(os.path.join(synth, "val2014"), tmp_path / "images")
    names = sorted(os.listdir(tmp_path / "images"))[:3]
    table = pa.table({"image": [f"images/{n}" for n in names], "id": ["a", "b", "c"],
                      "captions": [["a red square."], ["two circles."], ["a triangle."]]})
    pq.write_table(table, tmp_path / "caps.parquet")
    samples = load_hf(str(tmp_path / "caps.parquet"), "train")
    assert [s.id for s in samples] == ["a", "b", "c"] and samples[1].answers == ("two circles.",)
    assert samples[0].image == str(tmp_path / "images" / names[0]) and samples[0].load_image().size == (32, 32)


# --- the task table ------------------------------------------------------------------------------------------------

def test_task_table(synth):
    assert set(TASKS) == {"vqav2", "okvqa", "coco", "hf-vqa", "hf-caption", "flickr30k", "mme", "seed-bench", "mmmu-pro"}
    vqa, coco = get_task("vqav2"), get_task("coco")
    assert (vqa.kind, vqa.stop_words, vqa.max_new_tokens) == ("vqa", ("\n", "Question", "Answer", "Image"), 10)
    assert (coco.kind, coco.stop_words, coco.max_new_tokens) == ("caption", ("\n", "Caption", "Image"), 20)
    assert len(get_task("okvqa").load(synth, "val")) == N_VAL
    assert len(get_task("hf-vqa").load(os.path.join(synth, "hf", "vqa"), "val")) == N_VAL
    assert len(get_task("hf-caption").load(os.path.join(synth, "hf", "captions"), "val")) == N_VAL
    with pytest.raises(UserError, match=r"unknown task 'hf'; choose one of: vqav2, okvqa, coco, hf-vqa, hf-caption, flickr30k, "
                                         r"mme, seed-bench, mmmu-pro"):
        get_task("hf")
    with pytest.raises(UserError, match="has a 'question' column.*use task hf-vqa"):
        get_task("hf-caption").load(os.path.join(synth, "hf", "vqa"), "val")
    with pytest.raises(UserError, match="has no 'question' column.*use task hf-caption"):
        get_task("hf-vqa").load(os.path.join(synth, "hf", "captions"), "val")


# --- the generator -------------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_fast(synth, tmp_path):
    start = time.perf_counter()
    write_synthetic(str(tmp_path / "again"))  # datasets is imported already, as it is after the first write
    assert time.perf_counter() - start < 2.0
    assert _files(tmp_path / "again") == _files(synth), "same seed, byte-identical files"
    write_synthetic(str(tmp_path / "other"), seed=1)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(synth).keys() and other["dataset_coco.json"] != _files(synth)["dataset_coco.json"]


def test_synthetic_publishes_atomically_and_refuses_foreign_dirs(synth, tmp_path):
    before = os.stat(os.path.join(synth, "synthetic.json")).st_mtime_ns
    write_synthetic(synth)  # complete with the same parameters: nothing to do
    assert os.stat(os.path.join(synth, "synthetic.json")).st_mtime_ns == before
    with pytest.raises(UserError, match=r"other parameters: n_train=64 \(asked 8\)"):
        write_synthetic(synth, n_train=8)
    (tmp_path / "empty").mkdir()  # an empty directory made beforehand is filled
    write_synthetic(str(tmp_path / "empty"), n_train=4, n_val=4)
    assert len(load_vqa(str(tmp_path / "empty"), "val", "vqav2")) == 4
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="foreign exists and is not a synthetic data set"):
        write_synthetic(str(tmp_path / "foreign"))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], "no temporary sibling left behind"


# --- refusals: each names the file (or column) and the id -----------------------------------------------------------

def _copy_vqa(synth, dst) -> tuple[str, str]:
    """Copies of the val questions/annotations files; returns their paths."""
    paths = []
    for name in VQA_FILES["vqav2"]:
        paths.append(str(dst / name.format("val")))
        shutil.copy(os.path.join(synth, name.format("val")), paths[-1])
    return paths[0], paths[1]


def _edit(fpath, key, change):
    data = _json(fpath)
    change(data[key])
    with open(fpath, "w") as f:
        json.dump(data, f)


def _drop_first_annotation(anns):
    del anns[0]


def _empty_answers(anns):
    anns[0]["answers"] = []


def _empty_question(qs):
    qs[1]["question"] = "  "


def _duplicate_question(qs):
    qs.append(dict(qs[2]))


@pytest.mark.parametrize("which, change, pattern", [
    (1, _drop_first_annotation, r"questions\.json: question {q0} has no annotation in .*annotations\.json"),
    (1, _empty_answers, r"annotations\.json: annotation of question {q0} has no answers"),
    (0, _empty_question, r"questions\.json: question {q1} is empty"),
    (0, _duplicate_question, r"questions\.json: duplicate question_id {q2}"),
])
def test_vqa_bad_files(synth, tmp_path, which, change, pattern):
    paths = _copy_vqa(synth, tmp_path)
    qids = [q["question_id"] for q in _json(paths[0])["questions"]]
    _edit(paths[which], ["questions", "annotations"][which], change)
    with pytest.raises(UserError, match=pattern.format(q0=qids[0], q1=qids[1], q2=qids[2])):
        load_vqa(str(tmp_path), "val", "vqav2")


def test_vqa_missing_files_and_images(synth, tmp_path):
    with pytest.raises(UserError, match=r"vqav2 questions file not found: expected .*v2_OpenEnded_mscoco_val2014_q"):
        load_vqa(str(tmp_path), "val", "vqav2")
    questions_fpath, annotations_fpath = _copy_vqa(synth, tmp_path)
    os.remove(annotations_fpath)
    with pytest.raises(UserError, match=r"vqav2 annotations file not found: expected .*v2_mscoco_val2014_annotations"):
        load_vqa(str(tmp_path), "val", "vqav2")
    with pytest.raises(UserError, match=r"okvqa has no split 'test'; choose one of: train, val"):
        load_vqa(synth, "test", "okvqa")
    sample = load_vqa(synth, "val", "vqav2")[0]  # images are checked when loaded, not at load_vqa time
    with pytest.raises(UserError, match=r"image file not found: .*COCO_val2014_\d{12}\.jpg"):
        type(sample)(sample.id, str(tmp_path / os.path.basename(sample.image)), sample.question, sample.answers).load_image()


def test_coco_bad_files(synth, tmp_path):
    with pytest.raises(UserError, match=r"COCO Karpathy split file not found: expected .*dataset_coco\.json"):
        load_coco_captions(str(tmp_path), "val")
    fpath = str(tmp_path / "dataset_coco.json")
    data = _json(os.path.join(synth, "dataset_coco.json"))
    val = [im for im in data["images"] if im["split"] == "val"]
    val[0]["sentences"] = []
    val.append(dict(val[1]))
    with open(fpath, "w") as f:
        json.dump({"images": val}, f)
    with pytest.raises(UserError, match=rf"dataset_coco\.json: image {val[0]['cocoid']} has no captions"):
        load_coco_captions(str(tmp_path), "val")
    val[0]["sentences"] = val[1]["sentences"]
    with open(fpath, "w") as f:
        json.dump({"images": val}, f)
    with pytest.raises(UserError, match=rf"dataset_coco\.json: duplicate cocoid {val[1]['cocoid']}"):
        load_coco_captions(str(tmp_path), "val")


def test_hf_bad_input(synth, tmp_path):
    with pytest.raises(UserError, match="HF data set not found"):
        load_hf(str(tmp_path / "nowhere"), "train")
    with pytest.raises(UserError, match=r"hf/vqa has no split 'test'; it has: train, validation"):
        load_hf(os.path.join(synth, "hf", "vqa"), "test")
    pq.write_table(pa.table({"picture": [b"x"], "question": ["q?"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad\.parquet lacks column\(s\): image; answers or captions; "
                                        r"question_id or id or image_id \(it has: picture, question\)"):
        load_hf(str(tmp_path / "bad.parquet"), "train")
    pq.write_table(pa.table({"image": [b"x", b"y"], "id": [1, 1], "answers": [["a"], ["b"]]}), tmp_path / "dup.parquet")
    with pytest.raises(UserError, match=r"dup\.parquet: duplicate id 1"):
        load_hf(str(tmp_path / "dup.parquet"), "train")
    pq.write_table(pa.table({"image": [b"x"], "id": [1], "question": [""], "answers": [["a"]]}), tmp_path / "q.parquet")
    with pytest.raises(UserError, match=r"q\.parquet: id 1 has an empty question"):
        load_hf(str(tmp_path / "q.parquet"), "train")
