"""Teacher stage: exactness against an independent reference, batching, ranks, kill-and-resume, refusal.

The reference shares only the prompt building with the teacher (sampler, `build_prompt`, `encode`):
it runs a fresh model without DeepSpeed, one prompt at a time, and applies each layer's MLP to the
post-attention norm of the mid-residual stream itself, never touching the capture hooks.
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
from stages.models.encode import encode
from stages.tasks import get_task
from stages.tasks.pools import support_set, training_queries
from stages.tasks.prompts import build_prompt, reference_answer
from stages.tasks.sampler import sample_icds
from storage import layout
from storage._root import Root
from storage.inspection import verify
from storage.manifest import VOLATILE
from storage.reader import open_manifest, read_items

PIPELINE = shutil.which("pipeline", path=os.path.dirname(sys.executable))
CLI = [PIPELINE] if PIPELINE else [sys.executable, "-m", "pipeline.cli"]


# -- helpers -------------------------------------------------------------------------------------
def _config(model_dpath, data_root, store, tmp_path, *overrides):
    paths = [f"model.path={model_dpath}", f"task.root={data_root}", f"teacher.store={store}", f"run_dir={tmp_path}"]
    return resolve(load_config(None, [*paths, *overrides]))


def _reference(cfg) -> list[dict]:
    """Per (query, view), in store order: span ids, ICD ids and [t, L, d] MLP outputs of a plain forward."""
    t, tc = cfg.teacher, cfg.task
    task = get_task(tc.name)
    queries = training_queries(task, tc.root, tc.train_split, tc.num_queries)
    support = support_set(task, tc.root, tc.train_split, queries, tc.support)
    by_id = {s.id: s for s in support} | {q.id: q for q in queries}
    support_ids = [s.id for s in support]
    lm = load_model(cfg.model.path, cfg.model.family, cfg.model.dtype)  # fresh, no DeepSpeed
    layers = lm.adapter.decoder_layers(lm.model)
    mid: list[torch.Tensor | None] = [None] * len(layers)

    def keep_mid(i, module, args):  # the input of post_attention_layernorm is h + attention output
        mid[i] = args[0]

    handles = [layer.post_attention_layernorm.register_forward_pre_hook(functools.partial(keep_mid, i))
               for i, layer in enumerate(layers)]
    out = []
    try:
        for q in queries:
            for v in range(t.views):
                icd_ids = sample_icds(support_ids, q.id, t.shots, seed=t.seed, view=v)
                icds = [(by_id[i], reference_answer(by_id[i], tc.answer)) for i in icd_ids]
                prompt = build_prompt(task.kind, "icl", q, icds, answer=reference_answer(q, tc.answer))
                enc = encode(lm, [prompt])
                n = enc.span_lens[0]
                mid[:] = [None] * len(layers)
                with torch.no_grad():
                    res = lm.model(**enc.inputs, output_hidden_states=True)
                    # L x [1, T, d]
                    ffn = [layer.mlp(layer.post_attention_layernorm(h)) for layer, h in zip(layers, mid)]
                # The mid stream plus our MLP output is what the model itself passes to the next layer.
                for i in range(len(layers) - 1):
                    torch.testing.assert_close(mid[i] + ffn[i], res.hidden_states[i + 1], rtol=0, atol=0)
                hidden_tld = torch.stack([f[0, -n:] for f in ffn], dim=1)  # [t, L, d]
                out.append({"sample_id": q.id, "view": v, "token_ids": enc.span_ids[0], "icd_ids": icd_ids,
                            "hidden": hidden_tld})
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


def _finish(proc, timeout=120, expect=0) -> tuple[str, str]:
    rc = proc.wait(timeout=timeout)
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
    cfg = _config(model_dirs[family], data_root, tmp_path / "store", tmp_path,
                  "teacher.shots=2", "task.num_queries=4", "teacher.shard_size=2", "teacher.batch_size=1",
                  "teacher.views=2")
    teacher.run(cfg)
    stored = list(read_items(str(tmp_path / "store")))
    reference = _reference(cfg)
    assert len(stored) == len(reference) == 8
    for item, ref in zip(stored, reference):
        where = f"{family} {item.sample_id}/{item.view}"
        assert (item.sample_id, item.view) == (ref["sample_id"], ref["view"]), where
        assert item.token_ids.tolist() == ref["token_ids"], where
        assert list(item.icd_ids) == ref["icd_ids"], where
        assert item.hidden.dtype == ref["hidden"].dtype == torch.float32, where
        assert item.hidden.shape == ref["hidden"].shape, \
            f"{where}: {tuple(item.hidden.shape)} vs {tuple(ref['hidden'].shape)}"
        assert ref["hidden"].abs().sum() > 0, where
        assert torch.equal(item.hidden, ref["hidden"]), \
            f"{where}: max abs difference {(item.hidden - ref['hidden']).abs().max().item():.3g}"


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
    # Rows of a batch differ in length, so padding and span slicing are exercised.
    assert len({len(it.token_ids) for it in one[:4]}) > 1
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
    deadline = time.monotonic() + 120
    while not _published(killed):
        assert victim.poll() is None, \
            f"teacher exited ({victim.returncode}) before publishing:\n{victim.logs[1].read_text()}"
        assert time.monotonic() < deadline, "no shard published within 120 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL, "the teacher finished before it could be killed"
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
    rc = proc.wait(timeout=120)
    stderr = proc.logs[1].read_text()
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert f"error: store {store} was made with another configuration:" in stderr, stderr
    fields = re.findall(r"^  (\S+): store has .*, config has .*$", stderr, flags=re.M)
    assert fields == ["shots"], stderr
    assert "  shots: store has 2, config has 3" in stderr.splitlines(), stderr
    assert _published(store) == before
