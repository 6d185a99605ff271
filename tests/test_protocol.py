"""A store read, and its values recomputed, with storage/PROTOCOL.md alone (issue 14, section 4).

The teacher writes a tiny store; reading it and recomputing its values then use json, zarr, numpy,
PIL and plain transformers only, never this project's code. File names, array names and dtypes, the volatile
fields, the template strings, the image text and the decoder layer names are read from PROTOCOL.md
itself, so a wrong statement there fails here: a wrong template string changes the token ids, a
wrong layer or module changes the values.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = (REPO / "storage" / "PROTOCOL.md").read_text()
TEACHER_TIMEOUT_S = 900  # generous: the suite may run on a loaded 2-core machine
SETTINGS = {"task.num_queries": 6, "teacher.shots": 2, "teacher.shard_size": 4, "teacher.views": 2}
SUBMODULE = {"ffn": "mlp", "attn": "self_attn"}  # PROTOCOL.md, "What the values are"


# -- PROTOCOL.md, read as a document ---------------------------------------------------------------
def _tables(section: str) -> list[list[list[str]]]:
    """The markdown tables under `## section`, each as its body rows of cells."""
    body = PROTOCOL.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    tables, rows = [], None
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            rows = [] if rows is None else rows
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows is not None:
            tables.append(rows[2:])  # without the header and the rule
            rows = None
    return tables


def _row(table: list[list[str]], first_cell: str) -> list[str]:
    return next(r for r in table if r[0] == first_cell)


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def _literals(cell: str) -> list[str]:
    """The JSON string literals of a cell, decoded (PROTOCOL.md writes template strings so)."""
    return [json.loads(s) for s in re.findall(r'`("(?:[^"\\]|\\.)*")`', cell)]


# -- the store -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(model_dirs, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    store = tmp / "store"
    sets = {"model.path": model_dirs["idefics2"], "task.root": data_root, "teacher.store": store, **SETTINGS}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "teacher",
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "MIMIC_PIPELINE_HOME": str(tmp / "home"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}  # this tree's code, installed or not
    started = datetime.now(timezone.utc).replace(microsecond=0)
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=TEACHER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the teacher did not finish within {TEACHER_TIMEOUT_S} s: {cmd}")
    assert proc.returncode == 0, f"teacher exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return {"store": store, "sets": sets, "tmp": tmp, "started": started,
            "finished": datetime.now(timezone.utc), "model": model_dirs["idefics2"], "data": data_root}


def _read_store(root: Path) -> tuple[dict, dict[int, dict], dict[int, dict]]:
    """(manifest, shard -> marker, shard -> {array name: zarr array}), as PROTOCOL.md says to read them."""
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    markers, shards = {}, {}
    for name in sorted(os.listdir(root / "published")):
        if name.startswith("."):
            continue
        shard = int(name.removesuffix(".json"))
        markers[shard] = json.loads((root / "published" / name).read_text(encoding="utf-8"))
        group = zarr.open_group(str(root / markers[shard]["data"]), mode="r")
        shards[shard] = {a: group[a] for a in group.array_keys()}
    return manifest, markers, shards


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _checksum(array: zarr.Array) -> str:
    values = array[...]
    if array.dtype.kind in "OTU":  # strings: canonical JSON of the list
        return f"{zlib.crc32(_canonical([str(s) for s in values])):08x}"
    return f"{zlib.crc32(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder('<')).tobytes()):08x}"


# -- 1. the files ----------------------------------------------------------------------------------
def test_store_reads_with_plain_zarr_as_protocol_says(teacher_run):
    manifest, markers, shards = _read_store(teacher_run["store"])
    fields = _tables("Manifest")[0]
    assert sorted(manifest) == sorted(r[0].strip("`") for r in fields)
    # this document describes its own version and the older ones it names as still read (a float store is 3)
    documented = int(PROTOCOL.splitlines()[0].rsplit(" ", 1)[1])
    assert manifest["format_version"] == documented or f"reads versions {manifest['format_version']} and" in PROTOCOL

    # Volatile fields: when and by what the store was made.
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset().total_seconds() == 0, manifest["created_at"]
    assert teacher_run["started"] <= created <= teacher_run["finished"], manifest["created_at"]
    package = re.search(r'^name = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert re.fullmatch(rf"{re.escape(package)} \S+ on {re.escape(socket.gethostname())}", manifest["created_by"]), \
        manifest["created_by"]

    # Fingerprint: the canonical JSON of every non-volatile field, stored in each marker.
    volatile = [r[0].strip("`") for r in fields if r[3] == "yes"]
    assert volatile == ["created_at", "created_by"]
    fingerprint = hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k not in volatile})).hexdigest()

    # Shard arithmetic and items, query-major and view-minor.
    n, size, views = len(manifest["query_ids"]), manifest["shard_size"], manifest["views"]
    assert (n, size, views) == (6, 4, 2)
    assert sorted(markers) == list(range(math.ceil(n / size)))
    arrays = _tables("Shard data")[0]
    for s, marker in markers.items():
        assert marker["shard"] == s and marker["fingerprint"] == fingerprint and marker["skipped"] == {}
        assert re.fullmatch(rf"shards/{s:06d}-[0-9a-f]{{16}}", marker["data"]), marker["data"]
        group = shards[s]
        assert sorted(group) == sorted(r[0].strip("`") for r in arrays) == sorted(marker["crc32"])
        for name, shape, dtype, axes, _ in arrays:
            a = group[name.strip("`")]
            want = manifest["dtype"] if name == "`hidden`" else dtype.strip("`")
            assert a.dtype == np.dtype("T") if want == "string" else a.dtype == np.dtype(want), (name, a.dtype)
            assert a.metadata.dimension_names == tuple(x.strip() for x in axes.split(",")), name
            assert a.chunks == tuple(max(1, x) for x in a.shape), name
            assert marker["crc32"][name.strip("`")] == _checksum(a), f"shard {s}: checksum of {name}"
            if a.dtype.kind not in "OTU":  # the chunk file is the values' bytes: byte ranges of it are rows
                chunk = teacher_run["store"] / marker["data"] / name.strip("`") / ".".join("0" * a.ndim)
                assert chunk.read_bytes() == np.ascontiguousarray(a[...], dtype=a.dtype.newbyteorder("<")).tobytes(), name
        assert group["hidden"].attrs["value_dtype"] == manifest["dtype"]
        lo, hi = s * size, min((s + 1) * size, n)
        assert list(group["sample_ids"][...]) == [q for q in manifest["query_ids"][lo:hi] for _ in range(views)]
        offsets, keep = group["offsets"][...], group["keep"][...]
        assert offsets[0] == 0 and (np.diff(offsets) > 0).all() and offsets[-1] == marker["tokens"] == len(keep)
        assert keep.all() and group["hidden"].shape == (keep.sum(), manifest["n_layers"], manifest["d_model"])
        icd_offsets = group["icd_offsets"][...]
        assert (np.diff(icd_offsets) == manifest["fingerprint_fields"]["shots"]).all()


# -- 2. the values ---------------------------------------------------------------------------------
def test_values_recompute_from_protocol_alone(teacher_run):
    """Two items (first and last of the store) rebuilt from their ids: same token ids, same values."""
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    manifest, _, shards = _read_store(teacher_run["store"])
    fields = manifest["fingerprint_fields"]
    assert (fields["model"]["family"], fields["task"], fields["capture"], fields["span"]) == \
        ("idefics2", "vqav2", "ffn", "all")
    assert fields["prompt"]["template"] == "seed-tab6/v1" and f"`{fields['prompt']['template']}`" in PROTOCOL
    samples = _vqa_samples(teacher_run["data"], fields["split"])

    processor = AutoProcessor.from_pretrained(teacher_run["model"])
    processor.image_processor.do_image_splitting = False
    assert fields["model"]["processor"]["image_processor"]["do_image_splitting"] is False
    tok = processor.tokenizer
    model = Idefics2ForConditionalGeneration.from_pretrained(teacher_run["model"], dtype=torch.float32).eval()
    layer_name = _code(_row(_tables("What the values are")[0], "`idefics2`")[1])[0]
    captured = {}
    for l in range(manifest["n_layers"]):
        module = model.get_submodule(f"{layer_name.format(l=l)}.{SUBMODULE[fields['capture']]}")
        module.register_forward_hook(lambda m, args, out, l=l: captured.__setitem__(l, out))

    last = max(shards)
    for shard, item in ((0, 0), (last, shards[last]["sample_ids"].shape[0] - 1)):
        group = shards[shard]
        qid = str(group["sample_ids"][item])
        icd_offsets = group["icd_offsets"][...]
        icd_ids = [str(x) for x in group["icd_ids"][icd_offsets[item]:icd_offsets[item + 1]]]
        text, context, images = _prompt(samples, qid, icd_ids, fields, processor.image_seq_len)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        input_ids = [tok.bos_token_id] + ids + [tok.eos_token_id]
        offsets = group["offsets"][...]
        a, b = offsets[item], offsets[item + 1]
        span = input_ids[1 + n_ctx:]
        assert span == group["token_ids"][a:b].tolist(), f"item {qid}: token ids differ from the rebuilt prompt"

        inputs = torch.tensor([input_ids])
        with torch.no_grad():
            model(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                  **processor.image_processor([images], return_tensors="pt"))
        recomputed = torch.stack([captured[l][0, -len(span):] for l in range(manifest["n_layers"])], dim=1)
        stored = torch.from_numpy(group["hidden"][a:b])  # span "all": row r = token p
        assert stored.abs().sum() > 0
        torch.testing.assert_close(stored, recomputed, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"item {qid} (shard {shard}, item {item}): {m}")


def _vqa_samples(data_root: str, split: str) -> dict[str, dict]:
    """id -> question, references and image of the VQAv2 files, by the "Ids" table of PROTOCOL.md."""
    id_cell, rest = _row(_tables("Ids")[0], "`vqav2`")[1:]
    questions_file = next(c for c in _code(id_cell) if c.endswith(".json")).format(split=split)
    annotations_file, image_file = (next(c for c in _code(rest) if c.endswith(ext)) for ext in (".json", ".jpg"))
    root = Path(data_root)
    references = {a["question_id"]: [x["answer"] for x in a["answers"]]
                  for a in json.loads((root / annotations_file.format(split=split)).read_text())["annotations"]}
    return {str(q["question_id"]): {"question": q["question"].strip(), "references": references[q["question_id"]],
                                    "image": root / image_file.format(split=split, image_id=q["image_id"])}
            for q in json.loads((root / questions_file).read_text())["questions"]}


def _answer(references: list[str], policy: str) -> str:
    if policy == "first":
        return references[0]
    counts = Counter(references)
    return next(r for r in references if counts[r] == max(counts.values()))  # ties: first in file order


def _prompt(samples, qid, icd_ids, fields, image_seq_len) -> tuple[str, str, list[Image.Image]]:
    """(text, context, images) of an idefics2 VQA prompt, from PROTOCOL.md's template and image tables."""
    template, families = _tables("The k-shot prompt")
    instruction = _literals(_row(template, "instruction")[1])
    assert instruction == [fields["prompt"]["instruction"]]
    head, tail = _literals(_row(template, "item")[1])
    fake, image_token, fake_end = _literals(_row(families, "`idefics2`")[1])
    image_text = fake + image_token * image_seq_len + fake_end

    def item(sid, newline):
        s = samples[sid]
        answer = _answer(s["references"], fields["answer"])
        words = tail.replace("{question}", s["question"]).replace("{answer}", answer)
        return head + image_text + words + ("\n" if newline else "")

    context = instruction[0] + "".join(item(i, True) for i in icd_ids)
    images = [Image.open(samples[i]["image"]).convert("RGB") for i in [*icd_ids, qid]]
    return context + item(qid, False), context, images


# -- 3. a rerun keeps the manifest -----------------------------------------------------------------
def test_rerun_at_another_time_keeps_the_manifest(teacher_run, monkeypatch, capsys):
    """A rerun (here in-process) stamps another created_at and created_by, yet finds its store
    complete and leaves manifest.json as it is: the volatile fields are not compared."""
    from pipeline.config import load_config
    from pipeline.defaults import resolve
    from stages import teacher

    manifest_fpath = teacher_run["store"] / "manifest.json"
    before = manifest_fpath.read_bytes()
    stamp = {"created_at": "2000-01-01T00:00:00+00:00", "created_by": "mimic-pipeline 0.0.0 on elsewhere"}
    assert all(json.loads(before)[k] != v for k, v in stamp.items())
    monkeypatch.setattr(teacher, "creation_stamp", lambda: stamp)
    monkeypatch.setenv("MIMIC_PIPELINE_HOME", str(teacher_run["tmp"] / "home"))
    teacher.run(resolve(load_config(None, [f"{k}={v}" for k, v in teacher_run["sets"].items()])))
    assert "0 of 2 shards to write" in capsys.readouterr().out
    assert manifest_fpath.read_bytes() == before
