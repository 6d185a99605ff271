"""8-bit targets (teacher.store_dtype=int8, PROTOCOL.md "8-bit targets"): the quantization rule by hand, a store's
round trip through the writer and both readers, verify, the byte count, and the config that cannot hold logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from stages.errors import UserError
from storage import layout
from storage.inspection import info, verify
from storage.reader import TargetReader, read_items
from storage.writer import Item, open_for_write
from tests.test_storage import _chunk, make_manifest


def test_quantize_rounds_to_nearest_even_on_the_vectors_absmax_scale():
    # scales that are powers of two keep every x / s exact, so the ties below are real ties
    x = np.array([[127.0, -63.5, 31.75, 0.5, -0.5, 1.5],      # s = 127 / 127 = 1
                  [254.0, 3.0, 5.0, -1.0, 0.0, -254.0],        # s = 2: 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)  # all zero: s = 0, q = 0
    q, s = layout.quantize(x)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert s.tolist() == [[1.0], [2.0], [0.0]]  # one group: 6 values
    assert q.tolist() == [[127, -64, 32, 0, 0, 2], [127, 2, 2, 0, 0, -127], [0] * 6]
    assert layout.dequantize(q, s).tolist() == [[127, -64, 32, 0, 0, 2], [254, 4, 4, 0, 0, -254], [0] * 6]


def test_quantize_scales_each_group_of_128_values_on_its_own():
    # a 1000x value in the first group leaves the second group's grid as fine as without it
    x = np.zeros((1, 256), np.float32)
    x[0, :128], x[0, 128:] = 1.0, 0.5
    x[0, 3] = 1000.0
    q, s = layout.quantize(x)
    assert s.shape == (1, 2) and s.tolist() == [[np.float32(1000.0) / np.float32(127), np.float32(0.5) / np.float32(127)]]
    assert q[0, 128:].tolist() == [127] * 128 and q[0, 3] == 127 and q[0, 0] == 0  # 1.0 is under half a step of 7.9
    assert np.allclose(layout.dequantize(q, s)[0, 128:], 0.5)


def _expected(hidden: torch.Tensor) -> torch.Tensor:
    """q * s by the rule, in torch (round() is half to even there too), independently of layout.quantize:
    per group of 128 values (a vector of d values not a multiple of 128 is one group)."""
    d = hidden.shape[-1]
    grouped = hidden.reshape(*hidden.shape[:-1], d // 128 if d % 128 == 0 else 1, -1)
    s = grouped.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(grouped / s), torch.zeros(()))
    return (q.clamp(-127, 127) * s).reshape(hidden.shape)


def _write(url, m) -> dict:
    rng = np.random.default_rng(0)
    written, w = {}, open_for_write(str(url), m)
    for shard in range(m.n_shards):
        items = []
        for q in layout.kept_queries(m, shard, ()):
            for v in range(m.views):
                t = int(rng.integers(1, 5))
                hidden = torch.from_numpy(rng.standard_normal((t, m.n_layers, m.d_model), dtype=np.float32))
                hidden[0, 0] = 0.0  # an all-zero vector: scale 0
                hidden[-1, -1, 0] = 40.0  # an outlier: its vector's other values are coarse
                items.append(Item(q, v, rng.integers(0, 1000, size=t).astype(np.int32), hidden, ("c1",)))
                written[(q, v)] = hidden
        assert w.write_shard(shard, items)
    return written


def test_int8_store_reads_back_the_quantized_values_at_half_the_bytes(tmp_path):
    m = make_manifest(n_queries=6, views=2, shard_size=4, n_layers=3, d_model=256, dtype="int8")
    written = _write(tmp_path / "s8", m)
    assert verify(str(tmp_path / "s8")) == []
    by_key = {(it.sample_id, it.view): it.hidden for it in read_items(str(tmp_path / "s8"))}
    by_key_reader = {(it.sample_id, it.view): it.hidden for it in TargetReader(str(tmp_path / "s8"), seed=1).epoch(1)}
    assert set(by_key) == set(written) and set(by_key_reader) == {k for k in written if k[1] == 1}
    for key, hidden in written.items():
        want = _expected(hidden)
        for got in (by_key[key], by_key_reader.get(key, want)):
            assert got.dtype == torch.float32 and torch.equal(got, want)
        s = hidden.reshape(*hidden.shape[:-1], 2, 128).abs().amax(dim=-1, keepdim=True) / 127
        error = (want - hidden).reshape(s.shape[:-1] + (128,)).abs()
        assert (error <= s / 2 * (1 + 1e-6)).all()  # within half a step of each group's grid
    # 1 byte per value plus a float32 per token, layer and group of 128, against 2 for bfloat16
    summary = info(str(tmp_path / "s8"))
    assert summary["bytes_per_value"] == 1 + 4 / 128 and summary["bytes_per_token"] == 3 * (256 + 2 * 4)


def test_verify_and_the_reader_catch_a_damaged_or_missing_scale(tmp_path):
    m = make_manifest(n_queries=4, views=1, shard_size=4, n_layers=2, d_model=8, dtype="int8")
    _write(tmp_path, m)
    chunk = _chunk(tmp_path, 0, layout.SCALE)
    raw = bytearray(chunk.read_bytes())
    raw[:4] = np.float32(-1.0).tobytes()
    chunk.write_bytes(bytes(raw))
    assert any("hidden_scale" in p for p in verify(str(tmp_path)))
    chunk.write_bytes(bytes(raw[:-4]))  # a truncated scale: the reader sees it without checksums
    with pytest.raises(Exception, match="hidden_scale"):
        list(TargetReader(str(tmp_path), seed=0).epoch(0))


def test_int8_store_takes_no_logits():
    with pytest.raises(UserError, match="an int8 store holds no logits"):
        load_config(None, ["teacher.store_dtype=int8", "teacher.logits=topk:8"])


def test_cache_convert_quantizes_a_store_resumably_and_refuses_a_no_op(pipeline, tmp_path):
    m = make_manifest(n_queries=6, views=1, shard_size=2, n_layers=2, d_model=16, dtype="float32")
    written = _write(tmp_path / "f32", m)
    code, out, _ = pipeline("cache", "convert", tmp_path / "f32", tmp_path / "q8", "--dtype", "int8")
    assert code == 0 and "q8: int8" in out
    got = {(it.sample_id, it.view): it.hidden for it in read_items(str(tmp_path / "q8"))}
    assert got.keys() == written.keys() and all(torch.equal(got[k], _expected(h)) for k, h in written.items())
    marker = tmp_path / "q8" / layout.marker_rel(1)
    before = {p.name for p in (tmp_path / "q8" / "shards").iterdir()}
    marker.unlink()  # as if killed before shard 1 was published: a second run writes only that shard
    assert pipeline("cache", "convert", tmp_path / "f32", tmp_path / "q8", "--dtype", "int8")[0] == 0
    after = {p.name for p in (tmp_path / "q8" / "shards").iterdir()}
    assert len(before - after) == 1 and len(after - before) == 1 and next(iter(after - before)).startswith("000001-")
    assert verify(str(tmp_path / "q8")) == []
    code, _, err = pipeline("cache", "convert", tmp_path / "q8", tmp_path / "again", "--dtype", "int8")
    assert code == 2 and err.startswith("error: ") and "holds int8 already" in err and len(err.strip().splitlines()) == 1
