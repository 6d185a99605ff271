"""Bad input through the user-facing commands: one `error:` line on stderr naming the file or field and
what is wrong, a non-zero exit, no partial output that looks complete, nothing already written lost.

The commands run in-process through `pipeline.cli.main` (the console script's entry point, so the
same `error: ...` + exit 2 handling as a shell run), which is much faster than a subprocess per case.
Every case is listed in the README's Troubleshooting table.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
import yaml

from stages import teacher
from storage import layout
from storage._root import Root
from storage.inspection import info, verify
from storage.manifest import FORMAT_VERSION, OLDEST_FORMAT_VERSION

QUESTIONS, ANNOTATIONS = "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"


def one_error(result, pattern: str) -> str:
    """The single `error:` line (a store mismatch adds one indented line per field, then the fix)."""
    code, _, err = result
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), f"{errors[0]!r} does not match {pattern!r}"
    return errors[0]


def teacher_args(model, root, store, *extra, n=8, shots=2):
    return ["run", "teacher", "--set", f"model.path={model}", "--set", f"task.root={root}", "--store", store,
            "--num-queries", n, "--shots", shots, "--set", "teacher.shard_size=2", *extra]


def student_args(model, root, store, out, *extra, n=8, shots=2):
    return ["run", "student", "--set", f"model.path={model}", "--set", f"task.root={root}", "--store", store,
            "--set", f"task.num_queries={n}", "--shots", shots, "--set", f"student.out={out}", *extra]


@pytest.fixture
def data(data_root, tmp_path):
    """A private copy of the synthetic VQAv2 train split, to break."""
    dst = tmp_path / "data"
    dst.mkdir()
    for name in (QUESTIONS, ANNOTATIONS):
        shutil.copy(os.path.join(data_root, name), dst / name)
    shutil.copytree(os.path.join(data_root, "train2014"), dst / "train2014")
    return dst


def _queries(root, n=8):
    """The question records of the n training queries, in the order the pipeline draws them (task.seed's shuffle)."""
    from pipeline.config import TaskConfig
    from stages.tasks import get_task
    from stages.tasks.pools import training_queries
    with open(os.path.join(root, QUESTIONS)) as f:
        by_id = {str(q["question_id"]): q for q in json.load(f)["questions"]}
    return [by_id[s.id] for s in training_queries(get_task("vqav2"), str(root), "train", n, seed=TaskConfig.seed)]


def _image(root, i: int) -> str:
    return os.path.join(root, "train2014", f"COCO_train2014_{_queries(root)[i]['image_id']:012d}.jpg")


def _edit(fpath, key, change):
    with open(fpath) as f:
        d = json.load(f)
    change(d[key])
    with open(fpath, "w") as f:
        json.dump(d, f)


def _markers(store) -> dict[str, bytes]:
    dpath = os.path.join(store, layout.PUBLISHED)
    names = [n for n in os.listdir(dpath) if not n.startswith(".")] if os.path.isdir(dpath) else []
    return {n: open(os.path.join(dpath, n), "rb").read() for n in names}


@pytest.fixture(scope="module")
def store(model_dirs, data_root, tmp_path_factory):
    """A complete 2-shot store of 8 queries in 4 shards (never modified: tests copy it)."""
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    path = str(tmp_path_factory.mktemp("bad-input") / "store")
    teacher.run(resolve(load_config(None, [f"model.path={model_dirs['idefics2']}", f"task.root={data_root}",
                                           f"teacher.store={path}", "task.num_queries=8", "teacher.shots=2",
                                           "teacher.shard_size=2"])))
    assert verify(path) == []
    return path


@pytest.fixture
def store_copy(store, tmp_path):
    shutil.copytree(store, tmp_path / "store")
    return str(tmp_path / "store")


# -- images: the run stops at the bad one; what was published stays, and a rerun after the fix completes --------
def _break_missing(fpath):
    os.remove(fpath)


def _break_truncated(fpath):
    data = open(fpath, "rb").read()
    open(fpath, "wb").write(data[: len(data) // 2])


def _break_corrupt(fpath):
    open(fpath, "wb").write(b"\x89PNG but not really" * 10)


def _break_empty(fpath):
    open(fpath, "wb").close()


def _break_huge(fpath):
    """A valid 20000 x 20000 PNG (1 bit per pixel, all black): 48 KB on disk, past PIL's decompression-bomb limit."""
    side = 20000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(bytes(side * (1 + side // 8)), 9)  # per row: filter byte 0, then side / 8 bytes of pixels
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    with open(fpath, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


@pytest.mark.parametrize("breaks, pattern, rerun", [
    (_break_missing, r"^error: image file not found: .*COCO_train2014_\d{12}\.jpg \(sample \d+\)$", True),
    (_break_truncated, r"^error: image is truncated or corrupt: .*COCO_train2014_\d{12}\.jpg \(sample \d+\)", False),
    (_break_corrupt, r"^error: image is truncated or corrupt: .*COCO_train2014_\d{12}\.jpg \(sample \d+\)", False),
    (_break_empty, r"^error: image file is empty \(0 bytes\): .*COCO_train2014_\d{12}\.jpg \(sample \d+\)", False),
    (_break_huge, r"^error: image is too large to decode: .*COCO_train2014_\d{12}\.jpg \(sample \d+\): "
                  r"Image size \(400000000 pixels\) exceeds limit", False),
], ids=["missing", "truncated", "corrupt", "zero-size", "huge"])
def test_bad_image_stops_the_teacher_and_keeps_what_was_published(pipeline, model_dirs, data, store, tmp_path,
                                                                   breaks, pattern, rerun):
    out = str(tmp_path / "out")
    image = _image(data, 6)  # a query of the last shard (it may also be a demonstration of earlier ones)
    good = open(image, "rb").read()
    breaks(image)
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data, out)), pattern)
    before = _markers(out)
    assert len(before) < 4
    assert [p for p in verify(out) if "shards are not published" not in p] == []  # nothing half-published
    assert not info(out)["complete"]
    if not rerun:  # one case is enough to show the fixed rerun completing the store
        return
    open(image, "wb").write(good)
    assert pipeline(*teacher_args(model_dirs["idefics2"], data, out))[0] == 0
    after = _markers(out)
    assert {n: after[n] for n in before} == before  # published shards kept as they were, not rewritten
    assert verify(out) == [] and info(out)["content_digest"] == info(store)["content_digest"]


def test_huge_image_is_a_bad_sample_that_skip_skips(pipeline, model_dirs, data, tmp_path):
    huge_id = str(_queries(data)[6]["question_id"])
    _break_huge(_image(data, 6))
    out = str(tmp_path / "out")
    code, _, err = pipeline(*teacher_args(model_dirs["idefics2"], data, out, "--on-bad-sample", "skip"))
    assert code == 0, err
    assert verify(out) == []
    skipped = info(out)["skipped"]
    assert re.match(r"image is too large to decode: .*COCO_train2014_\d{12}\.jpg \(sample \d+\): Image size",
                    skipped[huge_id]), skipped
    assert all(f"(sample {huge_id})" in reason for reason in skipped.values()), skipped  # its prompts only


# -- data files --------------------------------------------------------------------------------------------------
def _empty_question(qs):
    qs[1]["question"] = " "


def _duplicate_question(qs):
    qs.append(dict(qs[2]))


def _no_answers(anns):
    anns[0]["answers"] = []


@pytest.mark.parametrize("fname, key, change, pattern", [
    (QUESTIONS, "questions", _empty_question, r"questions\.json: question \d+ is empty$"),
    (QUESTIONS, "questions", _duplicate_question, r"questions\.json: duplicate question_id \d+$"),
    (ANNOTATIONS, "annotations", _no_answers, r"annotations\.json: annotation of question \d+ has no answers$"),
], ids=["empty-question", "duplicate-ids", "no-answers"])
def test_bad_annotation_files_are_refused_before_any_work(pipeline, model_dirs, data, tmp_path, fname, key, change,
                                                          pattern):
    _edit(data / fname, key, change)
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data, tmp_path / "out")), pattern)
    assert not os.path.exists(tmp_path / "out")


def test_question_longer_than_the_context_is_refused(pipeline, model_dirs, data, tmp_path):
    first = _queries(data)[0]["question_id"]  # the first training query: it is in the first shard
    _edit(data / QUESTIONS, "questions",
          lambda qs: next(q for q in qs if q["question_id"] == first).update(question="why " * 5000 + "?"))
    line = one_error(pipeline(*teacher_args(model_dirs["idefics2"], data, tmp_path / "out")),
                     r"query \d+ is too long: .* past the model's context of 4096; shorten its question")
    assert "--shots 0" not in line  # no advice that cannot work: the query alone is too long
    assert _markers(tmp_path / "out") == {}


# -- task, model and config ----------------------------------------------------------------------------------------
def test_unknown_task(pipeline, model_dirs, data, tmp_path):
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data, tmp_path / "out", "--set", "task.name=gqa")),
              r"unknown task 'gqa'.*choose one of: vqav2, okvqa, coco, hf-vqa, hf-caption")


def test_unknown_model_family(pipeline, model_dirs, data, tmp_path):
    model = tmp_path / "llama"
    shutil.copytree(model_dirs["idefics2"], model)
    config = json.load(open(model / "config.json"))
    json.dump({**config, "model_type": "llama"}, open(model / "config.json", "w"))
    one_error(pipeline(*teacher_args(model, data, tmp_path / "out")),
              r"llama/config\.json: unknown model family 'llama'; supported: idefics, idefics2, idefics3$")


def test_truncated_model_config(pipeline, model_dirs, data, tmp_path):
    model = tmp_path / "cut"
    shutil.copytree(model_dirs["idefics2"], model)
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text[: len(text) // 2])
    one_error(pipeline(*teacher_args(model, data, tmp_path / "out")),
              r"^error: .*cut/config\.json is not valid JSON \(.*line \d+ column \d+.*\); is the model directory "
              r"complete\?")


def test_model_directory_without_processor_files(pipeline, model_dirs, data, tmp_path):
    model = tmp_path / "bare"
    shutil.copytree(model_dirs["idefics2"], model)
    for name in os.listdir(model):
        if name.startswith(("processor", "preprocessor", "tokenizer", "special_tokens", "chat_template")):
            os.remove(model / name)
    one_error(pipeline(*teacher_args(model, data, tmp_path / "out")),
              r"model directory .*bare has no processor/tokenizer files")


def test_config_unknown_key_in_file_and_override(pipeline, tmp_path):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"teacher": {"shotz": 4}}))
    one_error(pipeline("run", "teacher", "--config", tmp_path / "exp.yaml"),
              r"unknown key 'teacher\.shotz'; known keys: .*shots")
    one_error(pipeline("run", "student", "--set", "student.learning_rate=1e-3"), r"unknown key 'student\.learning_rate'")
    one_error(pipeline("eval", "--set", "evaluation.mode=icl"), r"unknown section 'evaluation'")


def test_config_wrong_type_in_file_and_override(pipeline, tmp_path):
    (tmp_path / "exp.toml").write_text('[teacher]\nshots = "eight"\n')
    one_error(pipeline("run", "teacher", "--config", tmp_path / "exp.toml"),
              r"config teacher\.shots: expected int, got str 'eight'$")
    one_error(pipeline("run", "teacher", "--set", "model.trust_remote_code=maybe"),
              r"config model\.trust_remote_code: expected bool, got str 'maybe'$")
    one_error(pipeline("run", "teacher", "--set", "teacher.on_bad_sample=ignore"),
              r"config teacher\.on_bad_sample: 'ignore' is not one of fail, skip$")


def test_config_non_finite_number_in_override_and_file(pipeline, tmp_path):
    one_error(pipeline("run", "student", "--set", "student.lr=nan"),
              r"^error: config student\.lr: expected a finite number, got nan$")
    one_error(pipeline("run", "student", "--set", "student.lr=1e39"),
              r"^error: config student\.lr: expected a number within float32's range \(±3\.4e38\), got 1e\+39$")
    from pipeline.config import load_config
    assert load_config(None, ["student.lr=3.4e38"]).student.lr == 3.4e38  # the largest float32s pass
    (tmp_path / "exp.toml").write_text("[student]\nw_ce = -inf\n")
    one_error(pipeline("run", "student", "--config", tmp_path / "exp.toml"),
              r"^error: config student\.w_ce: expected a finite number, got -inf$")


def test_config_file_missing_or_not_parsing(pipeline, tmp_path):
    one_error(pipeline("run", "teacher", "--config", tmp_path / "nope.yaml"), r"config file not found: .*nope\.yaml$")
    (tmp_path / "bad.yaml").write_text("teacher: {shots: [\n")
    one_error(pipeline("run", "teacher", "--config", tmp_path / "bad.yaml"), r"config file .*bad\.yaml does not parse")


@pytest.mark.parametrize("shots, pattern", [
    (0, r"config teacher\.shots: must be at least 1"),
    (-3, r"config teacher\.shots: must be at least 1"),
    (8, r"cannot draw 8 demonstrations: the support set offers 7 besides the query"),
])
def test_shots_out_of_range(pipeline, model_dirs, data, tmp_path, shots, pattern):
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data, tmp_path / "out", shots=shots)), pattern)
    assert not os.path.exists(tmp_path / "out")


# -- the store ---------------------------------------------------------------------------------------------------------
def test_store_path_not_writable(pipeline, model_dirs, data, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data, tmp_path / "a-file" / "store")),
              r"cannot create store directory .*a-file/store: Not a directory$")


def _without_root_rights() -> list[str]:
    """The prefix that runs a command subject to permission bits: none for a user other than root; for root,
    setpriv dropping the capabilities that override them (uid 0 stays, so everything root can read
    stays readable, e.g. an interpreter under /root, which an unprivileged uid could not even start)."""
    if os.geteuid() != 0:
        return []
    prefix = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"as root, the case needs setpriv (util-linux) to drop the override of permission bits: {e}")
    if probe.returncode != 0:
        pytest.skip(f"as root, the case needs CAP_SETPCAP to drop the override of permission bits: {probe.stderr}")
    return prefix


def test_store_in_a_read_only_directory(model_dirs, data, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    args = teacher_args(model_dirs["idefics2"], data, tmp_path / "ro" / "store")
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp_path / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*_without_root_rights(), sys.executable, "-m", "pipeline.cli", *map(str, args)],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    one_error((result.returncode, result.stdout, result.stderr),
              r"^error: cannot create store directory .*/ro/store: Permission denied$")
    assert os.listdir(tmp_path / "ro") == []


def test_disk_full_during_a_shard_write(pipeline, model_dirs, data_root, store, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real_write = layout.write_arrays
    calls = []

    def fill_up(root, rel, arrays, value_dtype):  # the second shard hits a full disk half-way through
        calls.append(rel)
        if len(calls) == 2:
            real_write(root, rel, {k: v[:0] if k == "icd_ids" else v for k, v in arrays.items()}, value_dtype)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(root, rel, arrays, value_dtype)

    monkeypatch.setattr(layout, "write_arrays", fill_up)
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data_root, out)),
              r"^error: cannot write shard 1 to .*/shards/000001-[0-9a-f]{16}: No space left on device$")
    assert set(_markers(out)) == {"000000.json"}
    assert layout.data_dirs(Root(out), 1) == []  # the half-written attempt is gone, never published
    monkeypatch.setattr(layout, "write_arrays", real_write)
    assert pipeline(*teacher_args(model_dirs["idefics2"], data_root, out))[0] == 0
    assert verify(out) == [] and info(out)["content_digest"] == info(store)["content_digest"]


def test_store_with_a_shard_missing(pipeline, model_dirs, data_root, store_copy, tmp_path):
    os.remove(os.path.join(store_copy, layout.PUBLISHED, "000002.json"))
    one_error(pipeline(*student_args(model_dirs["idefics2"], data_root, store_copy, tmp_path / "student")),
              r"store .* is incomplete: 1 of 4 shards are not published \(2\); rerun the teacher")
    assert not os.path.exists(tmp_path / "student" / "heads")
    code, _, err = pipeline("cache", "verify", store_copy)
    assert code == 1 and "1 of 4 shards are not published (2)" in err
    code, out, _ = pipeline("cache", "info", store_copy)
    assert code == 0 and json.loads(out)["missing_shards"] == [2]


def test_store_with_shard_data_missing(pipeline, store_copy):
    marker = json.load(open(os.path.join(store_copy, layout.PUBLISHED, "000001.json")))
    shutil.rmtree(os.path.join(store_copy, marker["data"]))
    code, _, err = pipeline("cache", "verify", store_copy)
    assert code == 1 and re.search(r"shard 1: cannot (open|read) shards/000001-", err), err


@pytest.mark.parametrize("version", [99, OLDEST_FORMAT_VERSION - 1])
def test_manifest_of_an_unknown_format_version(pipeline, model_dirs, data_root, store_copy, tmp_path, version):
    fpath = os.path.join(store_copy, layout.MANIFEST)
    manifest = json.load(open(fpath))
    json.dump({**manifest, "format_version": version}, open(fpath, "w"))
    pattern = (rf"store format version {version} is newer than this reader \(\d+\); upgrade mimic-pipeline"
               if version > FORMAT_VERSION else rf"has format version {version}, this reader reads versions \d+ to \d+ only")
    one_error(pipeline("cache", "info", store_copy), pattern)
    one_error(pipeline(*student_args(model_dirs["idefics2"], data_root, store_copy, tmp_path / "student")), pattern)
    one_error(pipeline(*teacher_args(model_dirs["idefics2"], data_root, store_copy)), pattern)
    assert json.load(open(fpath))["format_version"] == version  # nobody rewrote it


def test_marker_path_escaping_the_store_is_refused(pipeline, model_dirs, data_root, store_copy, tmp_path):
    fpath = os.path.join(store_copy, layout.PUBLISHED, "000000.json")
    marker = json.load(open(fpath))
    json.dump({**marker, "data": "../../../etc"}, open(fpath, "w"))
    one_error(pipeline(*student_args(model_dirs["idefics2"], data_root, store_copy, tmp_path / "student")),
              r"000000\.json points outside the store \('\.\./\.\./\.\./etc'\); refusing to read it")
    code, _, err = pipeline("cache", "verify", store_copy)
    assert code == 1 and "points outside the store" in err


# -- the student against a store made with another configuration ----------------------------------------------------
def _mismatch(result, *fields):
    code, _, err = result
    one_error(result, r"^error: store .* does not match this student's config:$")
    listed = re.findall(r"^  (\S+): store has .*, config has .*$", err, flags=re.M)
    assert all(any(f == field or f.startswith(field + ".") for f in listed) for field in fields), err
    assert "pipeline run teacher" in err.splitlines()[-1]


def test_student_refuses_a_store_of_another_model(pipeline, model_dirs, data_root, store, tmp_path):
    _mismatch(pipeline(*student_args(model_dirs["idefics"], data_root, store, tmp_path / "s")), "model")
    assert not os.path.exists(tmp_path / "s" / "heads")


def test_student_refuses_a_store_of_another_shot_count(pipeline, model_dirs, data_root, store, tmp_path):
    _mismatch(pipeline(*student_args(model_dirs["idefics2"], data_root, store, tmp_path / "s", shots=4)), "shots")


def test_student_refuses_a_store_of_another_task(pipeline, model_dirs, data_root, store, tmp_path):
    _mismatch(pipeline(*student_args(model_dirs["idefics2"], data_root, store, tmp_path / "s",
                                     "--set", "task.name=okvqa")), "task")


def test_student_refuses_a_store_of_another_prompt(pipeline, model_dirs, data_root, tmp_path, monkeypatch):
    old = str(tmp_path / "old-prompt")
    current = teacher.PROMPT_TEMPLATE
    monkeypatch.setattr(teacher, "PROMPT_TEMPLATE", "seed-tab6/v0")  # a store from before a prompt change
    assert pipeline(*teacher_args(model_dirs["idefics2"], data_root, old))[0] == 0
    monkeypatch.setattr(teacher, "PROMPT_TEMPLATE", current)
    _mismatch(pipeline(*student_args(model_dirs["idefics2"], data_root, old, tmp_path / "s")), "prompt")


# -- --on-bad-sample skip ---------------------------------------------------------------------------------------------
def test_on_bad_sample_skip_records_the_reasons_and_the_student_leaves_them_out(pipeline, model_dirs, data, tmp_path):
    import subprocess

    from storage.reader import TargetReader

    queries = _queries(data)
    missing_id, long_id = str(queries[6]["question_id"]), str(queries[3]["question_id"])
    os.remove(_image(data, 6))
    _edit(data / QUESTIONS, "questions",
          lambda qs: next(q for q in qs if str(q["question_id"]) == long_id).update(question="why " * 5000 + "?"))
    out = str(tmp_path / "out")
    support = ("--set", "task.support=train")  # demonstrations from the whole split: few prompts use the bad ones
    assert pipeline(*teacher_args(model_dirs["idefics2"], data, out, *support))[0] != 0  # default: fail
    code, _, err = pipeline(*teacher_args(model_dirs["idefics2"], data, out, *support, "--on-bad-sample", "skip"))
    assert code == 0, err
    assert verify(out) == []
    code, stdout, _ = pipeline("cache", "info", out)
    shown = json.loads(stdout)
    assert shown["complete"] and shown["skipped"] == info(out)["skipped"]
    skipped = shown["skipped"]
    assert re.match(r"image file not found: .*COCO_train2014_\d{12}\.jpg", skipped[missing_id]), skipped
    assert re.match(rf"query {long_id} is too long", skipped[long_id]), skipped
    for qid, reason in skipped.items():  # others only where a demonstration was one of the bad ones
        assert "\n" not in reason and (qid in (missing_id, long_id) or f"sample {missing_id}" in reason
                                       or "context" in reason), skipped
    kept = 8 - len(skipped)
    reader = TargetReader(out, seed=0)
    assert len(reader) == kept and not {it.sample_id for it in reader.epoch(0)} & set(skipped)

    student = str(tmp_path / "student")
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp_path / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, student_args(model_dirs["idefics2"], data, out, student,
           *support, "--set", "student.epochs=1", "--set", "student.global_batch=2", "--set", "student.micro_batch=2"))]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(student, "losses.jsonl")) as f:
        assert len(f.readlines()) == kept // 2  # one epoch over the kept queries only


@pytest.mark.parametrize("override, message", [
    ("student.save_every=0", "config student.save_every: must be at least 1"),
    ("task.num_queries=-1", "config task.num_queries: must be 0 or more, got -1"),
    ("student.shuffle_buffer=-2", "config student.shuffle_buffer: must be 0 or more, got -2"),
    ("student.prefetch=0", "config student.prefetch: must be at least 1, got 0"),
])
def test_out_of_range_config_values(override, message):
    from pipeline.config import load_config
    from stages.errors import UserError
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


def test_config_float_in_exponent_form():
    # PyYAML reads 1e-2 as a string (YAML 1.1 wants 1.0e-2); users type it either way.
    from pipeline.config import load_config
    from stages.errors import UserError
    assert load_config(None, ["student.lr=1e-2", "student.weight_decay=5E-4"]).student.lr == 0.01
    assert load_config(None, ["student.weight_decay=5E-4"]).student.weight_decay == 5e-4
    with pytest.raises(UserError, match=r"config student\.lr: expected float, got str 'fast'$"):
        load_config(None, ["student.lr=fast"])


def test_config_refuses_non_finite_numbers_in_every_float_field():
    import dataclasses
    import typing

    from pipeline.config import Config, load_config
    from stages.errors import UserError
    sections = {name: cls for name, cls in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(cls)}
    keys = [f"{name}.{key}" for name, cls in sections.items() for key, typ in typing.get_type_hints(cls).items()
            if typ is float]
    assert {"student.lr", "student.w_align", "student.clip"} <= set(keys), keys
    for key in keys:
        for raw, shown in (("nan", "nan"), (".inf", "inf"), ("-inf", "-inf"), ("1e999", "inf"), ("1" + "0" * 400, "inf")):
            with pytest.raises(UserError, match=rf"^config {re.escape(key)}: expected a finite number, got {shown}$"):
                load_config(None, [f"{key}={raw}"])


# -- the student's loss ------------------------------------------------------------------------------------------------
def _tensors(obj):
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return [obj] if hasattr(obj, "isfinite") else []


def _lr_1e30(store: str) -> list[str]:
    """A finite lr so large that AdamW's weight decay overflows the heads on the second step."""
    return ["--set", "student.lr=1e30"]


def _inf_target(store: str) -> list[str]:
    """The stored targets of the item the student reads last (in step 4 of 4) set to inf, as a teacher that
    overflowed would leave them (the reader does not check checksums, so only the loss can notice)."""
    import numpy as np
    import zarr

    from storage.reader import TargetReader
    shard, j = TargetReader(store, seed=0).order(0)[-1]  # the student's data order: student.seed 0, one view
    with open(os.path.join(store, layout.PUBLISHED, f"{shard:06d}.json")) as f:
        group = zarr.open_group(os.path.join(store, json.load(f)["data"]), mode="r+")
    offsets = group["offsets"][...]
    group["hidden"][offsets[j]:offsets[j + 1]] = np.inf  # span "all": one stored row per token
    return []


@pytest.mark.parametrize("breaks, what, at_step", [
    (_lr_1e30, r"the heads' weights are not finite after the update \(loss [\d.]+\)", None),
    (_inf_target, r"the loss is not finite \(loss inf, l_align inf\)", 4),
], ids=["lr-1e30", "inf-target"])
def test_student_whose_loss_blows_up_stops_and_keeps_its_last_good_checkpoint(model_dirs, data_root, store_copy,
                                                                              tmp_path, breaks, what, at_step):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out = tmp_path / "student"
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp_path / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, student_args(
        model_dirs["idefics2"], data_root, store_copy, out, *breaks(store_copy), "--set", "student.epochs=1",
        "--set", "student.global_batch=2", "--set", "student.micro_batch=2", "--set", "student.save_every=1"))]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    line = one_error((result.returncode, result.stdout, result.stderr),
                     rf"^error: student stopped at step (\d+): {what}; the last good checkpoint \(step\d+ in "
                     r".*checkpoints\) is kept; lower student\.lr, or check the store's targets$")
    step = int(re.search(r"step (\d+)", line).group(1))
    assert step == at_step if at_step else step >= 2, line
    assert f"(step{step - 1} in " in line
    rows = [json.loads(r) for r in open(out / "losses.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, step)), rows  # the bad step is not logged
    assert all(float("-inf") < r[k] < float("inf") for r in rows for k in ("loss", "l_align", "l_gt")), rows
    ckpt = out / "checkpoints"
    assert (ckpt / "last_complete").read_text() == f"step{step - 1}"
    assert not (ckpt / f"step{step}").exists() and not (out / "heads").exists()
    files = sorted((ckpt / f"step{step - 1}").glob("*.pt"))
    assert files, os.listdir(ckpt / f"step{step - 1}")
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        tensors = [t for f in files for t in _tensors(torch.load(f, weights_only=True))]  # as the student loads them
    assert tensors and all(t.isfinite().all() for t in tensors if t.is_floating_point())
