"""The target store: manifest and shard arithmetic, writing, publishing, checking, PROTOCOL.md."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import layout
from storage.errors import StoreError, StoreMismatch
from storage.inspection import info, verify
from storage.manifest import FORMAT_VERSION, OLDEST_FORMAT_VERSION, VOLATILE, Manifest, shard_owner
from storage.reader import TargetReader, open_manifest, read_items
from storage.writer import Item, open_for_write

REPO = Path(__file__).resolve().parents[1]


# -- helpers (also used by test_storage_reader.py) ------------------------------------------------
def make_manifest(n_queries=10, views=2, shard_size=4, n_layers=3, d_model=5, dtype="float32", **fields) -> Manifest:
    return Manifest(format_version=FORMAT_VERSION, fingerprint_fields={"shots": 32, "model": {"name": "tiny"}, **fields},
                    query_ids=tuple(f"q{i}" for i in range(n_queries)), views=views, shard_size=shard_size,
                    n_layers=n_layers, d_model=d_model, dtype=dtype, created_at="2026-11-26T00:00:00", created_by="here")


def make_items(m: Manifest, shard: int, skipped=(), seed=0) -> list[Item]:
    """The shard's items with random lengths, random values and random ICD counts."""
    rng = np.random.default_rng([seed, shard])
    items = []
    for q in layout.kept_queries(m, shard, skipped):
        for v in range(m.views):
            t = int(rng.integers(1, 5))
            bits = rng.integers(0, 2**16, size=(t, m.n_layers, m.d_model), dtype=np.uint16)
            if m.dtype == "float32":
                hidden = rng.standard_normal((t, m.n_layers, m.d_model), dtype=np.float32)
            elif m.dtype == "float16":
                hidden = bits.view(np.float16)  # every bit pattern, NaN payloads and -0 included
            else:
                hidden = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
            icds = tuple(f"c{int(c)}" for c in rng.integers(0, 99, size=int(rng.integers(0, 4))))
            items.append(Item(q, v, rng.integers(0, 1000, size=t).astype(np.int32), hidden, icds))
    return items


def write_store(url, m: Manifest, shards=None, skipped=None) -> dict:
    """Write the given shards (default all); returns (sample_id, view) -> Item as written."""
    w = open_for_write(str(url), m)
    written = {}
    for s in range(m.n_shards) if shards is None else shards:
        skip = (skipped or {}).get(s, {})
        items = make_items(m, s, skip)
        assert w.write_shard(s, items, skip)
        written.update({(it.sample_id, it.view): it for it in items})
    return written


def bits(hidden) -> np.ndarray:
    """Raw bit patterns, so that NaNs and -0 compare exactly."""
    if isinstance(hidden, torch.Tensor):
        hidden = hidden.view(torch.int16).numpy() if hidden.dtype == torch.bfloat16 else hidden.numpy()
    return np.ascontiguousarray(hidden).view(f"u{hidden.dtype.itemsize}")


def assert_same_item(got: Item, want: Item):
    assert (got.sample_id, got.view, got.icd_ids) == (want.sample_id, want.view, want.icd_ids)
    assert got.token_ids.dtype == np.int32 and (got.token_ids == want.token_ids).all()
    assert isinstance(got.hidden, torch.Tensor)
    assert np.array_equal(bits(got.hidden), bits(want.hidden))


# -- manifest and shard arithmetic ---------------------------------------------------------------
@given(n=st.integers(0, 400), size=st.integers(1, 60), world=st.integers(1, 17))
def test_shards_partition_the_queries_whatever_the_world_size(n, size, world):
    m = Manifest(1, {}, tuple(map(str, range(n))), 1, size, 1, 1, "float32")
    covered = [q for s in range(m.n_shards) for q in range(*m.shard_bounds(s))]
    assert covered == list(range(n))
    assert all(0 < hi - lo <= size for lo, hi in map(m.shard_bounds, range(m.n_shards)))
    assert all(m.shard_of(q) == s for s in range(m.n_shards) for q in range(*m.shard_bounds(s)))
    owners = [shard_owner(s, world) for s in range(m.n_shards)]
    assert all(0 <= r < world for r in owners)
    # every rank's set of shards is disjoint from the others' and together they cover all shards
    assert sorted(s for r in range(world) for s in range(m.n_shards) if shard_owner(s, world) == r) == list(range(m.n_shards))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=10)


@settings(max_examples=50)
@given(fields=st.dictionaries(st.text(max_size=6), json_values, max_size=5),
       ids=st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=20),
       views=st.integers(1, 4), size=st.integers(1, 8), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       stamp=st.text(max_size=10))
def test_manifest_json_round_trip_and_fingerprint(fields, ids, views, size, dtype, stamp):
    m = Manifest(FORMAT_VERSION, fields, tuple(ids), views, size, 2, 3, dtype, created_at=stamp)
    back = Manifest.from_json(m.to_json())
    assert back == m and back.fingerprint == m.fingerprint
    assert dataclasses.replace(m, created_at=stamp + "x", created_by="elsewhere").fingerprint == m.fingerprint
    assert dataclasses.replace(m, views=views + 1).fingerprint != m.fingerprint
    assert dataclasses.replace(m, fingerprint_fields={**fields, "new": 1}).fingerprint != m.fingerprint


def test_manifest_rejects_bad_values():
    for bad in ({"views": 0}, {"dtype": "float64"}, {"query_ids": ("a", "b", "a")}, {"shard_size": True},
                {"fingerprint_fields": {"x": object()}}):
        with pytest.raises(StoreError):
            dataclasses.replace(make_manifest(), **bad)
    with pytest.raises(StoreError, match="unknown field"):
        Manifest.from_json(json.dumps({**json.loads(make_manifest().to_json()), "extra": 1}))
    with pytest.raises(StoreError, match="lacks field"):
        Manifest.from_json(json.dumps({"format_version": 1}))


def test_diff_names_each_field_in_store_then_config_order():
    store = make_manifest()
    assert store.diff(dataclasses.replace(store, created_at="later")) == []
    config = dataclasses.replace(make_manifest(shots=8, model={"name": "big"}), views=3, created_at="later")
    assert store.diff(config) == ["model.name: store has 'tiny', config has 'big'",
                                  "shots: store has 32, config has 8", "views: store has 2, config has 3"]
    longer = dataclasses.replace(store, query_ids=store.query_ids + ("extra",))
    assert store.diff(longer) == ["query_ids: store has 10 ids, config has 11; first difference at position 10: "
                                  "store has nothing, config has 'extra'"]


# -- writing and reading back ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    m = make_manifest(n_queries=9, views=2, shard_size=4, dtype=dtype)
    written = write_store(tmp_path / "s", m, skipped={1: {"q5": "image is corrupt"}})
    got = list(read_items(str(tmp_path / "s")))
    assert [(it.sample_id, it.view) for it in got] == [(q, v) for q in m.query_ids if q != "q5" for v in range(2)]
    for it in got:
        assert it.hidden.dtype == getattr(torch, dtype)
        assert_same_item(it, written[it.sample_id, it.view])
    assert verify(str(tmp_path / "s")) == []
    summary = info(str(tmp_path / "s"))
    assert summary["complete"] and summary["skipped"] == {"q5": "image is corrupt"}
    assert summary["items_stored"] == 16 and summary["bytes_per_value"] == (4 if dtype == "float32" else 2)


def test_on_disk_layout_matches_protocol(tmp_path):
    """Read a shard with plain json + zarr, following PROTOCOL.md only."""
    m = make_manifest(n_queries=5, views=2, shard_size=3, dtype="bfloat16")
    written = write_store(tmp_path, m)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == {f.name for f in dataclasses.fields(Manifest)}
    assert sorted(os.listdir(tmp_path / "published")) == ["000000.json", "000001.json"]
    marker = json.loads((tmp_path / "published" / "000001.json").read_text())
    assert marker["fingerprint"] == m.fingerprint and re.fullmatch(r"shards/000001-[0-9a-f]{16}", marker["data"])
    group = zarr.open_group(str(tmp_path / marker["data"]), mode="r")
    hidden, offsets = group["hidden"], group["offsets"][...]
    assert hidden.dtype == np.uint16 and hidden.attrs["value_dtype"] == "bfloat16"
    assert hidden.chunks == hidden.shape and hidden.metadata.dimension_names == ("row", "layer", "hidden")
    # query index 4 is the 2nd kept query (j = 1) of shard 1; view 1 -> item i = j*V + v = 3
    i = 1 * 2 + 1
    want = written["q4", 1]
    got = torch.from_numpy(hidden[offsets[i]:offsets[i + 1]].view(np.int16)).view(torch.bfloat16)
    assert np.array_equal(bits(got), bits(want.hidden))
    icd_offsets = group["icd_offsets"][...]
    assert tuple(group["icd_ids"][icd_offsets[i]:icd_offsets[i + 1]]) == want.icd_ids
    assert group["sample_ids"][i] == "q4"
    assert marker["crc32"]["hidden"] == f"{zlib.crc32(hidden[...].astype('<u2').tobytes()):08x}"  # PROTOCOL.md, Checksums


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 9), views=st.integers(1, 3), size=st.integers(1, 4), data=st.data())
def test_coordinate_map(tmp_path, n, views, size, data):
    """(query, view, layer, token) -> hidden[offsets[j*V + v] + t, l] for every stored value."""
    m = make_manifest(n_queries=n, views=views, shard_size=size, n_layers=2, d_model=2)
    skipped = data.draw(st.sets(st.sampled_from(m.query_ids)))
    url = tmp_path / uuid.uuid4().hex
    per_shard = {m.shard_of(m.query_ids.index(q)): {} for q in skipped}
    for q in skipped:
        per_shard[m.shard_of(m.query_ids.index(q))][q] = "bad"
    written = write_store(url, m, skipped=per_shard)
    for q_index, q in enumerate(m.query_ids):
        shard = m.shard_of(q_index)
        marker = json.loads((url / layout.marker_rel(shard)).read_text())
        group = zarr.open_group(str(url / marker["data"]), mode="r")
        kept = [x for x in m.query_ids[slice(*m.shard_bounds(shard))] if x not in marker["skipped"]]
        assert (q in skipped) == (q not in kept)
        for v in range(views) if q in kept else ():
            i = kept.index(q) * views + v
            a, b = group["offsets"][i:i + 2]
            assert np.array_equal(group["hidden"][a:b], written[q, v].hidden)
            assert np.array_equal(group["token_ids"][a:b], written[q, v].token_ids)


def test_write_shard_checks_items(tmp_path):
    m = make_manifest()
    w = open_for_write(str(tmp_path), m)
    items = make_items(m, 0)
    with pytest.raises(ValueError, match="first difference at item 1"):
        w.write_shard(0, [items[0], items[2], items[1], *items[3:]])  # view-major instead of view-minor
    with pytest.raises(ValueError, match="hidden is numpy float64"):
        w.write_shard(0, [dataclasses.replace(items[0], hidden=items[0].hidden.astype(np.float64)), *items[1:]])
    with pytest.raises(ValueError, match="expected \\(3, 3, 5\\)"):
        bad = dataclasses.replace(items[0], token_ids=np.zeros(3, np.int32), hidden=np.zeros((3, 3, 4), np.float32))
        w.write_shard(0, [bad, *items[1:]])
    with pytest.raises(ValueError, match="not queries of shard 0"):
        w.write_shard(0, items, {"q9": "x"})
    assert w.published() == set()
    assert w.write_shard(0, items) and not w.write_shard(0, items)  # a published shard is never rewritten


# -- publishing, resume, refusal ---------------------------------------------------------------------
def test_losing_a_publish_race_keeps_the_winner(tmp_path, monkeypatch):
    """Two writers of one shard (a contract violation, e.g. a job started twice): one publishes, the
    other discards its data, and the store stays consistent."""
    import storage.writer as writer

    m = make_manifest(n_queries=4, shard_size=4)
    url = str(tmp_path)
    real = writer._publish

    def rival_publishes_first(root, shard, marker):
        monkeypatch.setattr(writer, "_publish", real)
        assert open_for_write(url, m).write_shard(shard, make_items(m, shard, seed=1))
        return real(root, shard, marker)

    monkeypatch.setattr(writer, "_publish", rival_publishes_first)
    assert not open_for_write(url, m).write_shard(0, make_items(m, 0, seed=2))
    assert len(os.listdir(tmp_path / "shards")) == 1 and verify(url) == []
    want = {(it.sample_id, it.view): it for it in make_items(m, 0, seed=1)}
    for it in read_items(url):
        assert_same_item(it, want[it.sample_id, it.view])


def test_unpublished_shard_is_invisible(tmp_path, monkeypatch):
    m = make_manifest(n_queries=8, shard_size=4)
    url = str(tmp_path)
    write_store(url, m, shards=[0])
    w = open_for_write(url, m)

    def crash(*args):
        raise RuntimeError("killed before publish")

    monkeypatch.setattr("storage.writer._publish", crash)
    with pytest.raises(RuntimeError):
        w.write_shard(1, make_items(m, 1))
    monkeypatch.undo()
    assert len(os.listdir(tmp_path / "shards")) == 2  # shard 1's data is complete on disk ...
    assert w.published() == {0}                        # ... but not published
    assert {it.sample_id for it in read_items(url)} == {"q0", "q1", "q2", "q3"}
    assert len(TargetReader(url, seed=0, require_complete=False)) == 4
    with pytest.raises(StoreError, match="1 of 2 shards are not published"):
        TargetReader(url, seed=0)
    assert verify(url) == ["1 of 2 shards are not published (1); rerun the teacher with the same configuration to fill them"]
    assert info(url)["unpublished_dirs"] != [] and info(url)["missing_shards"] == [1]
    assert w.write_shard(1, make_items(m, 1))  # the rerun publishes it and removes the abandoned attempt
    assert info(url)["unpublished_dirs"] == [] and verify(url) == []


def test_crash_while_writing_arrays_leaves_nothing_published(tmp_path, monkeypatch):
    m = make_manifest(n_queries=4, shard_size=4)
    w = open_for_write(str(tmp_path), m)
    real = layout.write_arrays

    def half_write(root, rel, arrays, value_dtype):
        real(root, rel, {**arrays, "icd_ids": arrays["icd_ids"][:0]}, value_dtype)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(layout, "write_arrays", half_write)
    with pytest.raises(StoreError, match="cannot write shard 0 .*No space left on device"):
        w.write_shard(0, make_items(m, 0))
    assert w.published() == set() and list(read_items(str(tmp_path))) == []
    assert os.listdir(tmp_path / "shards") == []  # the failed attempt cleaned up after itself


def test_resume_fills_holes_with_any_world_size(tmp_path):
    m = make_manifest(n_queries=20, shard_size=3)  # 7 shards
    url = str(tmp_path / "resumed")
    # "rank 1 of 2" crashed: only rank 0's shards (0, 2, 4, 6) got published
    write_store(url, m, shards=[s for s in range(m.n_shards) if shard_owner(s, 2) == 0])
    assert open_for_write(url, m).published() == {0, 2, 4, 6}
    # a rerun with 3 ranks writes only the holes
    for rank in range(3):
        w = open_for_write(url, m)
        todo = [s for s in range(m.n_shards) if shard_owner(s, 3) == rank and s not in w.published()]
        for s in todo:
            assert w.write_shard(s, make_items(m, s))
    assert verify(url) == [] and info(url)["complete"]
    full = tmp_path / "uninterrupted"
    write_store(full, m)
    assert info(url)["content_digest"] == info(str(full))["content_digest"]  # identical to an uninterrupted run


def test_changed_configuration_is_refused_naming_the_field(tmp_path):
    url = str(tmp_path)
    open_for_write(url, make_manifest())
    open_for_write(url, dataclasses.replace(make_manifest(), created_at="tomorrow", created_by="other"))  # volatile
    with pytest.raises(StoreMismatch) as e:
        open_for_write(url, make_manifest(shots=8))
    assert e.value.lines == ["shots: store has 32, config has 8"]
    assert str(e.value).splitlines()[0] == f"store {url} was made with another configuration:"
    assert "delete this store" in str(e.value).splitlines()[-1]
    with pytest.raises(StoreMismatch) as e:
        open_for_write(url, dataclasses.replace(make_manifest(), dtype="bfloat16", n_layers=4))
    assert e.value.lines == ["n_layers: store has 3, config has 4", "dtype: store has 'float32', config has 'bfloat16'"]


_RACER = """
import sys, time
from storage.errors import StoreMismatch
from storage.manifest import FORMAT_VERSION, Manifest
from storage.writer import open_for_write
url, start, shots = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
m = Manifest(FORMAT_VERSION, {"shots": shots}, ("a", "b"), 1, 1, 1, 1, "float32")
while time.time() < start:
    pass
try:
    open_for_write(url, m)
    print("ok")
except StoreMismatch as e:
    print("mismatch", e.lines)
"""


@pytest.mark.parametrize("shots", [(4, 4, 4, 4), (4, 8)])
def test_racing_manifest_creation(tmp_path, shots):
    """Processes that start at the same instant: exactly one manifest wins, equal ones all succeed."""
    url = str(tmp_path / "store")
    start = time.time() + 1.5  # past every interpreter's start-up (no torch is imported)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, url, str(start), str(k)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in shots]
    results = [p.communicate(timeout=900) for p in procs]  # generous: a loaded machine starts Python slowly
    assert all(p.returncode == 0 for p in procs), results
    outputs = [out.strip() for out, _ in results]
    winner = open_manifest(url).fingerprint_fields["shots"]
    for k, out in zip(shots, outputs):
        assert out == "ok" if k == winner else out.startswith("mismatch")
    assert sorted(os.listdir(url)) == ["manifest.json", "published", "shards"]  # no temporary files left


def test_fsspec_url_round_trip():
    """The same store through fsspec (memory://) instead of local files."""
    url = f"memory://stores/{uuid.uuid4().hex}"
    m = make_manifest(n_queries=7, shard_size=3, dtype="bfloat16")
    written = write_store(url, m, shards=[0, 2])
    assert open_for_write(url, m).published() == {0, 2}
    for it in read_items(url):
        assert_same_item(it, written[it.sample_id, it.view])
    assert verify(url) == ["1 of 3 shards are not published (1); rerun the teacher with the same configuration to fill them"]
    with pytest.raises(StoreMismatch):
        open_for_write(url, make_manifest(n_queries=7, shard_size=3, dtype="float16"))


# -- checking damaged stores -------------------------------------------------------------------------
def _chunk(url, shard: int, array: str) -> Path:
    """The one chunk file of an array of a published shard."""
    marker = json.loads((Path(url) / layout.marker_rel(shard)).read_text())
    return next(p for p in (Path(url) / marker["data"] / array).iterdir() if p.name != "zarr.json")


@pytest.fixture
def store(tmp_path):
    m = make_manifest(n_queries=8, shard_size=3)
    write_store(tmp_path, m)
    return str(tmp_path)


def test_verify_detects_a_truncated_chunk(store):
    chunk = _chunk(store, 1, "hidden")
    chunk.write_bytes(chunk.read_bytes()[:-8])
    problems = verify(store)
    assert len(problems) == 1 and re.match(r"shard 1: cannot read shards/000001-[0-9a-f]{16}/hidden: ValueError", problems[0])
    with pytest.raises(StoreError, match="shard 1: cannot read .*/hidden"):
        list(read_items(store))


def test_verify_detects_flipped_bytes_and_a_deleted_chunk(store):
    chunk = _chunk(store, 0, "hidden")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    _chunk(store, 2, "token_ids").unlink()
    problems = verify(store)
    assert any(p.startswith("shard 0") and "hidden does not match its checksum" in p for p in problems), problems
    assert any(p.startswith("shard 2") and "token_ids does not match its checksum" in p for p in problems), problems


def test_verify_reports_a_missing_shard_and_a_foreign_marker(store):
    os.remove(Path(store) / "published" / "000001.json")
    (Path(store) / "published" / "000099.json").write_text("{}")
    assert verify(store) == [f"{store}/published/000099.json: not a marker of any of the 3 shards",
                             "1 of 3 shards are not published (1); rerun the teacher with the same configuration to fill them"]


def test_unknown_format_version_is_refused(store):
    path = Path(store) / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 7, "new_field": 1}))
    expected = f"store format version 7 is newer than this reader ({FORMAT_VERSION}); upgrade mimic-pipeline"
    with pytest.raises(StoreError, match=re.escape(expected)):
        open_manifest(store)
    with pytest.raises(StoreError, match=re.escape(expected)):
        list(read_items(store))
    with pytest.raises(StoreError, match=re.escape(expected)):
        TargetReader(store, seed=0)
    with pytest.raises(StoreError, match=re.escape(expected)):
        open_for_write(store, make_manifest(n_queries=8, shard_size=3))
    assert verify(store)[0].startswith(expected)
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": OLDEST_FORMAT_VERSION - 1}))
    with pytest.raises(StoreError) as e:
        open_manifest(store)
    assert str(e.value) == (f"store {store} has format version {OLDEST_FORMAT_VERSION - 1}, this reader reads versions "
                            f"{OLDEST_FORMAT_VERSION} to {FORMAT_VERSION} only; rebuild it with `pipeline run teacher "
                            "--shots 32 --store NEW_PATH` and the config that made it")  # one line, with the command


def test_a_directory_with_other_files_is_not_taken_over(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match=f"{tmp_path} is not empty \\(thesis.tex\\) and holds no store"):
        open_for_write(str(tmp_path), make_manifest())


def test_missing_store_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match=f"no store at {tmp_path}/nope: manifest.json is missing"):
        open_manifest(str(tmp_path / "nope"))


@pytest.mark.parametrize("data", ["../../etc", "/etc/passwd", "shards/../../x", "shards/000001-0123456789abcdef/../..",
                                  "s3://elsewhere/x", "shards\\..\\x"])
def test_marker_paths_cannot_escape_the_root(store, data):
    path = Path(store) / "published" / "000001.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "data": data}))
    with pytest.raises(StoreError, match="outside the store|unexpected data path"):
        list(read_items(store))
    with pytest.raises(StoreError, match="outside the store|unexpected data path"):
        TargetReader(store, seed=0)
    assert any("outside the store" in p or "unexpected data path" in p for p in verify(store))


def test_marker_of_another_shard_is_refused(store):
    published = Path(store) / "published"
    (published / "000001.json").write_bytes((published / "000002.json").read_bytes())
    assert any("describes shard 2" in p for p in verify(store))


# -- PROTOCOL.md stays in step with the code ------------------------------------------------------------
def _table(section: str) -> list[list[str]]:
    """Body rows (as cells) of the first markdown table under the heading `## section` of PROTOCOL.md."""
    text = (REPO / "storage" / "PROTOCOL.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = body.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i, ln in enumerate(lines[first:]) if not ln.startswith("|")), len(lines) - first)
    table = lines[first:first + end]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table[2:]]  # skip header and rule


_JSON_TYPE = {"int": "integer", "str": "string", "dict": "object", "tuple[str, ...]": "array of strings"}


def test_protocol_manifest_table_matches_the_dataclass():
    rows = _table("Manifest")
    fields = dataclasses.fields(Manifest)
    assert [r[0].strip("`") for r in rows] == [f.name for f in fields]
    assert [r[1] for r in rows] == [_JSON_TYPE[f.type] for f in fields]
    assert [r[0].strip("`") for r in rows if r[3] == "yes"] == list(VOLATILE)
    assert all(r[3] in ("yes", "no") and r[2] for r in rows)


def test_protocol_marker_and_array_tables_match_the_code():
    rows = _table("Markers")
    assert [r[0].strip("`") for r in rows] == [f.name for f in dataclasses.fields(layout.Marker)]
    assert [r[1] for r in rows] == [_JSON_TYPE[f.type] for f in dataclasses.fields(layout.Marker)]
    assert [r[0].strip("`") for r in _table("Shard data")] == list(layout.ARRAYS)
    assert [r[0].strip("`") for r in _table("Reserved: logits")] == list(layout.RESERVED)
    assert [r[0].strip("`") for r in _table("8-bit targets")] == [layout.SCALE]
    assert f"format version {FORMAT_VERSION}" in (REPO / "storage" / "PROTOCOL.md").read_text().splitlines()[0]


def test_storage_never_imports_models():
    for path in (REPO / "storage").glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+(transformers|stages|pipeline|deepspeed)\b", path.read_text(), re.M), path


def test_inspection_and_writing_do_not_import_torch(tmp_path):
    code = ("import sys, numpy as np; from storage.writer import open_for_write, Item; from storage.inspection import info, verify;"
            "from storage.manifest import FORMAT_VERSION, Manifest; m = Manifest(FORMAT_VERSION, {}, ('a',), 1, 1, 2, 2, 'float16');"
            "w = open_for_write(sys.argv[1], m); w.write_shard(0, [Item('a', 0, np.array([1]), np.zeros((1, 2, 2), np.float16), ())]);"
            "assert verify(sys.argv[1]) == [] and info(sys.argv[1])['complete']; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, check=True, timeout=900)


def test_text_only_span_stores_rows_of_kept_tokens_only(tmp_path):
    """keep marks the span tokens with a stored row; the reader hands back exactly those rows."""
    m = make_manifest(n_queries=3, views=1, shard_size=3)
    rng = np.random.default_rng(0)
    items, kept_rows = [], {}
    for q in m.query_ids:
        t = int(rng.integers(3, 8))
        keep = rng.random(t) < 0.5
        keep[0] = True
        hidden = torch.from_numpy(rng.standard_normal((int(keep.sum()), m.n_layers, m.d_model)).astype(np.float32))
        items.append(Item(q, 0, np.arange(t, dtype=np.int32), hidden, ("a",), keep))
        kept_rows[q] = (keep, hidden)
    writer = open_for_write(str(tmp_path / "s"), m)
    writer.write_shard(0, items)
    for item in read_items(str(tmp_path / "s")):
        keep, hidden = kept_rows[item.sample_id]
        assert (item.keep == keep).all() and torch.equal(item.hidden, hidden)
    assert verify(str(tmp_path / "s")) == []
    bad = Item("q0", 0, np.arange(4, dtype=np.int32), torch.zeros(4, m.n_layers, m.d_model), ("a",),
               np.array([True, False, True, True]))
    with pytest.raises(ValueError, match="kept tokens"):
        open_for_write(str(tmp_path / "t"), m).write_shard(0, [bad] + items[1:])
