"""Teacher stage: exactness against an independent reference, batching, ranks, kill-and-resume, refusal.

The reference shares no code with the teacher: it reads the questions and answers from the official
files, writes each k-shot prompt out by hand in the seed Tab. 6 format with the demonstrations the store
recorded, tokenizes it with the checkpoint's own processor and runs a plain transformers forward (no
DeepSpeed, one prompt at a time) with its own hooks on each decoder layer's MLP.
Subprocess runs use the installed `pipeline` command with OMP_NUM_THREADS=1, so that every store
compared bit for bit was computed with the same thread count.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.defaults import resolve
from stages import teacher
from stages.models import load_model
from storage import layout
from storage._root import Root
from storage.convert import convert
from storage.inspection import verify
from storage.manifest import VOLATILE
from storage.reader import open_manifest, read_items

PIPELINE = shutil.which("pipeline", path=os.path.dirname(sys.executable))
CLI = [PIPELINE] if PIPELINE else [sys.executable, "-m", "pipeline.cli"]


# -- helpers -------------------------------------------------------------------------------------
QUESTIONS, ANNOTATIONS = "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"
VQA_INSTRUCTION = "Instruction: provide an answer to the question. Use the image to answer.\n"  # seed Tab. 6


def _config(model_dpath, data_root, store, tmp_path, *overrides):
    paths = [f"model.path={model_dpath}", f"task.root={data_root}", f"teacher.store={store}", f"run_dir={tmp_path}"]
    return resolve(load_config(None, [*paths, *overrides]))


def _vqa_train(root) -> dict[str, dict]:
    """Question id -> question, answer shown (the annotators' most common, ties: first in file order) and image
    path, in questions-file order, read from the official files directly."""
    with open(os.path.join(root, QUESTIONS)) as f:
        questions = json.load(f)["questions"]
    with open(os.path.join(root, ANNOTATIONS)) as f:
        given = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in json.load(f)["annotations"]}
    return {str(q["question_id"]): {
        "question": q["question"], "answer": max(given[q["question_id"]], key=given[q["question_id"]].count),
        "image": os.path.join(root, "train2014", f"COCO_train2014_{q['image_id']:012d}.jpg")} for q in questions}


def _vqa_item(family, q) -> str:
    """One "Image:{image} Question: {q} Answer: {a}" item (seed Tab. 6); Idefics' processor strips the space
    that follows an image."""
    space = "" if family == "idefics" else " "
    return f"Image:<image>{space}Question: {q['question']} Answer: {q['answer']}"


def _processor_inputs(family, processor, text: str, images: list) -> dict:
    """The official processor's inputs for `text`, an image wherever it says <image>."""
    if family == "idefics2":
        return processor(text=text, images=[images], return_tensors="pt")
    # Idefics takes interleaved text and images and writes BOS itself.
    segments = text.split("<image>")
    pieces = [p for seg, img in zip(segments, images) for p in (seg, img)] + [segments[-1]]
    return processor(text=[pieces], add_special_tokens=False, add_eos_token=False, return_tensors="pt")


def _reference(family, model_dpath, data_root, stored) -> list[dict]:
    """Per stored item: the span ids and [t, L, d] MLP outputs of a plain transformers forward of the k-shot prompt,
    written out by hand with the item's recorded demonstrations and tokenized by the official processor."""
    import transformers
    from PIL import Image

    data = _vqa_train(data_root)
    processor = transformers.AutoProcessor.from_pretrained(model_dpath)
    if family == "idefics2":
        processor.image_processor.do_image_splitting = False  # one image, one tile: as the authors ran it
        model = transformers.Idefics2ForConditionalGeneration.from_pretrained(model_dpath, dtype=torch.float32)
        layers = model.model.text_model.layers
    else:
        model = transformers.IdeficsForVisionText2Text.from_pretrained(model_dpath, dtype=torch.float32)
        layers = model.model.layers
    model.eval()
    ffn, mid = [None] * len(layers), [None] * len(layers)

    def keep(into, i, module, args, out=None):  # a forward hook (out) or pre-hook (args[0]); row 0 of the batch
        into[i] = (args[0] if out is None else out)[0]

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.mlp.register_forward_hook(functools.partial(keep, ffn, i)),
        # the input of post_attention_layernorm is the residual stream the MLP output is added to
        layer.post_attention_layernorm.register_forward_pre_hook(functools.partial(keep, mid, i)))]
    eos, out = processor.tokenizer.eos_token, []
    try:
        for item in stored:
            q, icds = data[item.sample_id], [data[i] for i in item.icd_ids]
            context = VQA_INSTRUCTION + "".join(_vqa_item(family, d) + "\n" for d in icds)
            query = _vqa_item(family, q) + eos
            images = [Image.open(d["image"]).convert("RGB") for d in [*icds, q]]
            ids_ctx = _processor_inputs(family, processor, context, images[:-1])["input_ids"][0].tolist()
            inputs = _processor_inputs(family, processor, context + query, images)
            ids = inputs["input_ids"][0].tolist()
            assert ids[0] == processor.tokenizer.bos_token_id and ids[: len(ids_ctx)] == ids_ctx
            span = ids[len(ids_ctx):]
            # The span reads back as the query item: each image's tokens stand for one <image>.
            decoded = processor.tokenizer.decode(span, skip_special_tokens=False)
            assert re.sub(r"<fake_token_around_image>(<image>)+<fake_token_around_image>", "<image>", decoded) == query
            with torch.no_grad():
                res = model(**inputs, output_hidden_states=True)
            # The residual stream plus the hooked output is what the model passes to the next layer: we hooked the FFN.
            for i in range(len(layers) - 1):
                torch.testing.assert_close(mid[i] + ffn[i], res.hidden_states[i + 1][0], rtol=0, atol=0)
            out.append({"token_ids": span, "hidden": torch.stack([f[-len(span):] for f in ffn], dim=1)})
    finally:
        for h in handles:
            h.remove()
    return out


def _teacher_cmd(model_dpath, data_root, store, *extra, num_queries=8, shots=2):
    sets = {"model.path": model_dpath, "task.root": data_root, "teacher.store": store,
            "task.num_queries": num_queries, "teacher.shots": shots, "teacher.shard_size": 2}
    return [*CLI, "run", "teacher", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]


def _start(cmd, tmp_path, name):
    """Start a CLI subprocess; stdout/stderr go to files (no pipe can fill up and block it)."""
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp_path / "home"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=tmp_path)
    proc.logs = (tmp_path / f"{name}.out", tmp_path / f"{name}.err")
    out.close(), err.close()
    return proc


# How long a test waits on a subprocess before failing: generous, since on a loaded 2-core machine a run
# takes many times as long as on an idle one; the bound only keeps a hung process from hanging the suite.
WAIT_S = 1800


def _wait(proc) -> int:
    try:
        return proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{proc.args} still running after {WAIT_S} s") from None


def _finish(proc, expect=0) -> tuple[str, str]:
    rc = _wait(proc)
    stdout, stderr = (p.read_text() for p in proc.logs)
    assert rc == expect, f"{proc.args} exited {rc}, expected {expect}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return stdout, stderr


def _published(store) -> set[int]:
    dpath = os.path.join(store, layout.PUBLISHED)
    names = os.listdir(dpath) if os.path.isdir(dpath) else []
    return {int(m.group(1)) for n in names if (m := re.match(r"^(\d{6,})\.json$", n))}


def _manifest_dict(store) -> dict:
    d = json.loads(Root(store).read(layout.MANIFEST))
    return {k: v for k, v in d.items() if k not in VOLATILE}


def _assert_same_store(a, b):
    """Same manifest (volatile fields aside), same markers (data path aside), bit-identical items."""
    assert _manifest_dict(a) == _manifest_dict(b)
    manifest = layout.read_manifest(Root(a))
    markers_a, problems_a = layout.load_markers(Root(a), manifest)
    markers_b, problems_b = layout.load_markers(Root(b), manifest)
    assert problems_a == problems_b == []
    assert sorted(markers_a) == sorted(markers_b) == list(range(manifest.n_shards))
    for s in markers_a:
        ma, mb = (dict(m.__dict__, data=None) for m in (markers_a[s], markers_b[s]))
        assert ma == mb, f"shard {s} markers differ"
    items_a, items_b = list(read_items(a)), list(read_items(b))
    assert len(items_a) == len(items_b) == manifest.n_queries * manifest.views
    for x, y in zip(items_a, items_b):
        assert (x.sample_id, x.view, x.icd_ids) == (y.sample_id, y.view, y.icd_ids)
        assert np.array_equal(x.token_ids, y.token_ids), f"{x.sample_id}/{x.view}: token ids differ"
        assert torch.equal(x.hidden, y.hidden), f"{x.sample_id}/{x.view}: hidden states differ"


# -- 1. exactness against an independent reference ------------------------------------------------
@pytest.mark.parametrize("family", ["idefics", "idefics2"])
def test_targets_equal_plain_forward_reference(family, model_dirs, data_root, tmp_path):
    shots, n_queries, views = 2, 4, 2
    cfg = _config(model_dirs[family], data_root, tmp_path / "store", tmp_path, f"teacher.shots={shots}",
                  f"task.num_queries={n_queries}", "teacher.shard_size=2", "teacher.batch_size=1",
                  f"teacher.views={views}")
    teacher.run(cfg)
    stored = list(read_items(str(tmp_path / "store")))
    # The support set is the training queries themselves: N distinct questions of the train split.
    pool = [it.sample_id for it in stored[::views]]
    assert len(set(pool)) == n_queries and set(pool) <= set(_vqa_train(data_root))
    assert [(it.sample_id, it.view) for it in stored] == [(q, v) for q in pool for v in range(views)]
    for it in stored:  # valid draws: k distinct demonstrations from the pool, never the query
        assert len(set(it.icd_ids)) == shots and set(it.icd_ids) <= set(pool) - {it.sample_id}, it.icd_ids
    assert any(stored[i].icd_ids != stored[i + 1].icd_ids for i in range(0, len(stored), views)), \
        "each view draws its own demonstrations"
    reference = _reference(family, model_dirs[family], data_root, stored)
    for item, ref in zip(stored, reference):
        where = f"{family} {item.sample_id}/{item.view}"
        assert item.token_ids.tolist() == ref["token_ids"], where
        assert item.hidden.dtype == ref["hidden"].dtype == torch.float32, where
        assert item.hidden.shape == ref["hidden"].shape, \
            f"{where}: {tuple(item.hidden.shape)} vs {tuple(ref['hidden'].shape)}"
        assert ref["hidden"].abs().sum() > 0, where
        torch.testing.assert_close(item.hidden, ref["hidden"], rtol=0, atol=0, msg=lambda m: f"{where}: {m}")


# -- 2. batched == one at a time -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["idefics", "idefics2"])
def test_batched_targets_equal_unbatched(family, model_dirs, data_root, tmp_path):
    stores = {}
    for batch_size in (1, 4):
        store = tmp_path / f"store-b{batch_size}"
        teacher.run(_config(model_dirs[family], data_root, store, tmp_path, "teacher.shots=2", "task.num_queries=4",
                            "teacher.shard_size=4", "teacher.views=2", f"teacher.batch_size={batch_size}"))
        stores[batch_size] = list(read_items(str(store)))
    one, batched = stores[1], stores[4]
    assert len(one) == len(batched) == 8
    # The spans of a batch (prompts in query-major, view-minor order) differ in length, so padding and span
    # slicing are exercised.
    assert any(len({len(it.token_ids) for it in one[lo: lo + 4]}) > 1 for lo in (0, 4))
    assert len({tuple(it.icd_ids) for it in one[:4]}) > 1
    for x, y in zip(one, batched):
        assert (x.sample_id, x.view, x.icd_ids) == (y.sample_id, y.view, y.icd_ids)
        assert np.array_equal(x.token_ids, y.token_ids)
        torch.testing.assert_close(y.hidden, x.hidden, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{x.sample_id}/{x.view}: {m}")


def test_image_cache_keeps_to_its_byte_budget(model_dirs, data_root, tmp_path, monkeypatch):
    """Each image is decoded once while the decoded images fit the budget; with a budget smaller than one
    image nothing is kept, every use decodes again, and the store is the same."""
    from collections import Counter

    from stages.tasks.sample import Sample
    decoded, load_image = Counter(), Sample.load_image
    monkeypatch.setattr(Sample, "load_image", lambda self: decoded.update([self.id]) or load_image(self))
    overrides = ("teacher.shots=4", "task.num_queries=8", "teacher.shard_size=4")
    teacher.run(_config(model_dirs["idefics2"], data_root, tmp_path / "cached", tmp_path, *overrides))
    assert set(decoded.values()) == {1}
    decoded.clear()
    monkeypatch.setattr(teacher, "IMAGE_CACHE_BYTES", 1)
    teacher.run(_config(model_dirs["idefics2"], data_root, tmp_path / "uncached", tmp_path, *overrides))
    assert max(decoded.values()) > 1 and sum(decoded.values()) == 8 * (4 + 1)  # every prompt's 5 images
    _assert_same_store(str(tmp_path / "cached"), str(tmp_path / "uncached"))


@pytest.mark.parametrize("family", ["idefics", "idefics2"])
def test_text_only_span_keeps_the_text_rows_of_the_full_span(family, model_dirs, data_root, tmp_path):
    stores = {}
    for span in ("all", "text"):
        store = tmp_path / f"store-{span}"
        teacher.run(_config(model_dirs[family], data_root, store, tmp_path, "teacher.shots=2", "task.num_queries=4",
                            "teacher.shard_size=4", f"teacher.span={span}"))
        stores[span] = list(read_items(str(store)))
    image_id = load_model(model_dirs[family]).tokenizer.convert_tokens_to_ids("<image>")
    for full, text in zip(stores["all"], stores["text"]):
        assert np.array_equal(full.token_ids, text.token_ids)  # the student still gets every span id
        is_text = full.token_ids != image_id
        assert not is_text.all() and (text.keep == is_text).all() and full.keep.all()
        assert torch.equal(text.hidden, full.hidden[torch.from_numpy(is_text)])
    assert open_manifest(str(tmp_path / "store-text")).fingerprint_fields["span"] == "text"


def test_store_dtype_rounds_the_model_outputs_and_is_in_the_fingerprint(model_dirs, data_root, tmp_path):
    """teacher.store_dtype=bfloat16 from the float32 model: each stored value is the float32 store's value rounded
    to bfloat16 (round to nearest even, as torch rounds), and the manifest (so the fingerprint) says bfloat16."""
    stores = {}
    for dtype in ("", "bfloat16"):
        store = tmp_path / f"store-{dtype or 'model'}"
        teacher.run(_config(model_dirs["idefics2"], data_root, store, tmp_path, "teacher.shots=2", "task.num_queries=4",
                            "teacher.shard_size=4", f"teacher.store_dtype={dtype}"))
        stores[dtype] = str(store)
    full, half = open_manifest(stores[""]), open_manifest(stores["bfloat16"])
    assert (full.dtype, half.dtype) == ("float32", "bfloat16") and full.fingerprint != half.fingerprint
    assert half.fingerprint_fields["dtype"] == "float32"  # the model still ran in float32
    pairs = list(zip(read_items(stores[""]), read_items(stores["bfloat16"]), strict=True))
    for a, b in pairs:
        assert b.hidden.dtype == torch.bfloat16
        bits = a.hidden.numpy().view(np.uint32).astype(np.uint64)  # round to nearest even, by hand on the bits
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        assert np.array_equal(b.hidden.view(torch.int16).numpy().view(np.uint16), rounded)
    convert(stores[""], str(tmp_path / "converted"), "bfloat16")  # `pipeline cache convert`: the same store
    _assert_same_store(str(tmp_path / "converted"), stores["bfloat16"])


def test_int8_store_holds_the_model_outputs_quantized_per_token_and_layer(model_dirs, data_root, tmp_path):
    """teacher.store_dtype=int8: each stored token and layer is the float32 store's vector x quantized by hand per
    group of 128 values (the tiny model's d, unless 128 divides it), s = max |x| / 127, q = round-half-even(x / s),
    read back as q * s."""
    stores = {}
    for dtype in ("", "int8"):
        stores[dtype] = str(tmp_path / f"store-{dtype or 'model'}")
        teacher.run(_config(model_dirs["idefics2"], data_root, stores[dtype], tmp_path, "teacher.shots=2",
                            "task.num_queries=4", "teacher.shard_size=4", f"teacher.store_dtype={dtype}"))
    assert open_manifest(stores["int8"]).dtype == "int8"
    for a, b in zip(read_items(stores[""]), read_items(stores["int8"]), strict=True):
        d = a.hidden.shape[-1]
        x = a.hidden.reshape(*a.hidden.shape[:-1], d // 128 if d % 128 == 0 else 1, -1)
        s = x.abs().amax(dim=-1, keepdim=True) / 127
        assert b.hidden.dtype == torch.float32 and torch.equal(b.hidden, (torch.round(x / s) * s).reshape(a.hidden.shape))
    # `pipeline cache convert` of the float32 store is that same store: same fingerprint, markers and values
    convert(stores[""], str(tmp_path / "converted"), "int8")
    _assert_same_store(str(tmp_path / "converted"), stores["int8"])


# -- 3. ranks --------------------------------------------------------------------------------------
def test_two_ranks_and_half_written_store_equal_one_rank(model_dirs, data_root, tmp_path):
    model = model_dirs["idefics2"]
    full, two, half = (str(tmp_path / n) for n in ("store-1rank", "store-2rank", "store-half"))
    procs = {
        "full": _start(_teacher_cmd(model, data_root, full), tmp_path, "full"),
        "r0": _start(_teacher_cmd(model, data_root, two, "--rank", "0", "--world-size", "2"), tmp_path, "r0"),
        "r1": _start(_teacher_cmd(model, data_root, two, "--rank", "1", "--world-size", "2"), tmp_path, "r1"),
        "half": _start(_teacher_cmd(model, data_root, half, "--rank", "0", "--world-size", "2"), tmp_path, "half"),
    }
    for p in procs.values():
        _finish(p)
    assert _published(half) == {0, 2}  # rank 0 of 2 owns shards 0 and 2 of 4
    stdout, _ = _finish(_start(_teacher_cmd(model, data_root, half), tmp_path, "resume"))
    assert "2 of 4 shards to write" in stdout
    _assert_same_store(two, full)
    _assert_same_store(half, full)
    stdout, _ = _finish(_start([*CLI, "cache", "verify", half], tmp_path, "verify"))
    assert "ok" in stdout


# -- 4. kill and resume ----------------------------------------------------------------------------
def test_killed_run_resumes_to_identical_store(model_dirs, data_root, tmp_path):
    model = model_dirs["idefics2"]
    killed, whole = str(tmp_path / "store-killed"), str(tmp_path / "store-whole")
    kw = dict(num_queries=16, shots=8)  # 8 shards of 2 queries
    victim = _start(_teacher_cmd(model, data_root, killed, **kw), tmp_path, "victim")
    uninterrupted = _start(_teacher_cmd(model, data_root, whole, **kw), tmp_path, "whole")
    deadline = time.monotonic() + WAIT_S
    while not _published(killed):
        assert victim.poll() is None, \
            f"teacher exited ({victim.returncode}) before publishing:\n{victim.logs[1].read_text()}"
        assert time.monotonic() < deadline, f"the teacher published no shard within {WAIT_S} s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the teacher finished before it could be killed"
    _finish(uninterrupted)

    # Whatever is listed as published reads back complete and equal to the uninterrupted run.
    listed = _published(killed)
    assert 0 < len(listed) < 8, f"kill landed outside the run: {len(listed)} of 8 shards published"
    problems = verify(killed)
    assert len(problems) == 1 and "shards are not published" in problems[0], problems
    manifest = layout.read_manifest(Root(killed))
    reference = {(it.sample_id, it.view): it for it in read_items(whole)}
    partial = list(read_items(killed))
    assert len(partial) == sum(len(range(*manifest.shard_bounds(s))) for s in listed) * manifest.views
    for it in partial:
        ref = reference[it.sample_id, it.view]
        assert np.array_equal(it.token_ids, ref.token_ids) and torch.equal(it.hidden, ref.hidden)

    _finish(_start(_teacher_cmd(model, data_root, killed, **kw), tmp_path, "rerun"))
    _assert_same_store(killed, whole)
    assert verify(killed) == []


# -- 5. a changed config is refused ----------------------------------------------------------------
def test_changed_config_is_refused_naming_the_field(model_dirs, data_root, tmp_path):
    model, store = model_dirs["idefics2"], str(tmp_path / "store")
    teacher.run(_config(model, data_root, store, tmp_path,
                        "teacher.shots=2", "task.num_queries=8", "teacher.shard_size=2"))
    before = _published(store)
    proc = _start(_teacher_cmd(model, data_root, store, shots=3), tmp_path, "changed")
    rc = _wait(proc)
    stderr = proc.logs[1].read_text()
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert f"error: store {store} was made with another configuration:" in stderr, stderr
    fields = re.findall(r"^  (\S+): store has .*, config has .*$", stderr, flags=re.M)
    assert fields == ["shots"], stderr
    assert "  shots: store has 2, config has 3" in stderr.splitlines(), stderr
    assert _published(store) == before
