"""Writing a target store: create-or-check the manifest, then write and publish whole shards.

A shard's data goes to a fresh directory shards/<shard>-<random>/; the shard is published by one
last atomic step, the exclusive creation of published/<shard>.json (PROTOCOL.md, "Writing and publishing").
"""
from __future__ import annotations

import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from storage import layout
from storage._root import Root
from storage.errors import StoreError
from storage.manifest import Manifest, ensure_same

if TYPE_CHECKING:
    import torch


@dataclass
class Logits:
    """An item's teacher next-token distributions at its answer positions (PROTOCOL.md, "Reserved: logits").

    pos: int32 [P], the span positions t whose next token (t + 1) is an answer token or the EOS.
    values: [P, W] logits at temperature 1 in the manifest dtype: W = K, those of `ids` (topk:K), or the vocabulary.
    lse: float32 [P], logsumexp of each row over the whole vocabulary (top-k keeps the tail's mass).
    ids: int32 [P, K], the K largest logits' token ids, largest first (topk:K); None for full.
    """

    pos: np.ndarray
    values: np.ndarray | torch.Tensor
    lse: np.ndarray
    ids: np.ndarray | None = None


@dataclass
class Item:
    """One (query, view) record.

    sample_id: the query id. view: which of the V ICD draws (0 <= view < V).
    token_ids: int32 [t], ids of the query + answer + EOS span.
    hidden: [t, L, d] in the manifest dtype. The writer takes a torch tensor, or a numpy array
        (uint16 bit patterns for bfloat16); readers always return a torch tensor. An int8 store takes
        float32 values and quantizes them (layout.quantize); its readers return q * s in float32.
    icd_ids: ids of the in-context demonstrations of this view, in prompt order.
    keep: bool [t], which span tokens have a row in `hidden` (None: all of them; a text-only span
        leaves out the image tokens). `hidden` then has keep.sum() rows.
    logits: the teacher's answer-token distributions, exactly when the store holds them (teacher.logits).
    """

    sample_id: str
    view: int
    token_ids: np.ndarray
    hidden: np.ndarray | torch.Tensor
    icd_ids: tuple[str, ...]
    keep: np.ndarray | None = None
    logits: Logits | None = None


def open_for_write(url: str, manifest: Manifest) -> StoreWriter:
    """Open (creating if absent) the store at `url` for `manifest`.

    Several ranks may call this at once: exactly one creates manifest.json, the others read it back.
    A store whose fingerprint differs raises StoreMismatch with one line per differing field.
    """
    root = Root(url)
    ours = {layout.MANIFEST, layout.PUBLISHED, layout.SHARDS}
    if root.read(layout.MANIFEST) is None and (other := [n for n in root.listdir("") if n not in ours and n[0] != "."]):
        raise StoreError(f"{url} is not empty ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) and holds "
                         "no store; choose a new or empty directory for the store")
    root.makedirs()
    root.makedirs(layout.PUBLISHED)
    root.makedirs(layout.SHARDS)
    if not root.create(layout.MANIFEST, manifest.to_json().encode("utf-8")):
        ensure_same(layout.read_manifest(root), manifest, url,
                    fix="Use another store path, or delete this store to rebuild it with the new configuration.")
    return StoreWriter(root, manifest)


class StoreWriter:
    """Writes the shards of one store. Each shard must have exactly one writer (see shard_owner)."""

    def __init__(self, root: Root, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    def published(self) -> set[int]:
        """Shards already published (by any rank, in any earlier run)."""
        markers, problems = layout.load_markers(self.root, self.manifest)
        if problems:
            raise StoreError(problems[0])
        return set(markers)

    def write_shard(self, shard: int, items: list[Item], skipped: dict[str, str] | None = None) -> bool:
        """Write shard `shard` completely, then publish it. Returns False (and writes nothing) if the
        shard was already published; a published shard is never overwritten.

        items: exactly the shard's (query, view) pairs, query-major and view-minor, leaving out the
        queries in `skipped` (query id -> reason, recorded in the shard's marker).
        """
        skipped = {str(k): str(v) for k, v in (skipped or {}).items()}
        arrays = _shard_arrays(self.manifest, shard, items, skipped)
        if self.root.read(layout.marker_rel(shard)) is not None:
            return False
        data_rel = f"{layout.SHARDS}/{layout.shard_name(shard)}-{secrets.token_hex(8)}"
        try:
            layout.write_arrays(self.root, data_rel, arrays, self.manifest.dtype)
            # The checksums (CPU) are taken while the data goes to the disk (I/O): BENCHMARKS.md, P4.
            with ThreadPoolExecutor(max_workers=1) as pool:
                synced = pool.submit(self.root.fsync_tree, data_rel)
                crc32 = {name: layout.checksum(values) for name, values in arrays.items()}
                synced.result()
        except OSError as e:
            self.root.remove_tree(data_rel)
            raise StoreError(f"cannot write shard {shard} to {self.root.url}/{data_rel}: {e.strerror or e}") from None
        marker = layout.Marker(shard=shard, fingerprint=self.manifest.fingerprint, data=data_rel,
                               tokens=len(arrays["token_ids"]), skipped=skipped,
                               crc32=crc32)
        if not _publish(self.root, shard, marker):
            self.root.remove_tree(data_rel)  # another writer published this shard first
            return False
        # Directories of earlier, interrupted attempts at this shard can never be published now.
        for rel in layout.data_dirs(self.root, shard):
            if rel != data_rel:
                self.root.remove_tree(rel)
        return True


def _publish(root: Root, shard: int, marker: layout.Marker) -> bool:
    """The one atomic step that makes a shard visible (a separate function so tests can fail it)."""
    return root.create(layout.marker_rel(shard), marker.to_json())


def _shard_arrays(m: Manifest, shard: int, items: list[Item], skipped: dict[str, str]) -> dict[str, np.ndarray]:
    """Check the items against the manifest and pack them into the shard arrays of PROTOCOL.md."""
    lo, hi = m.shard_bounds(shard)
    if unknown := sorted(set(skipped) - set(m.query_ids[lo:hi])):
        raise ValueError(f"skipped ids {unknown[:5]} are not queries of shard {shard}")
    want = [(q, v) for q in layout.kept_queries(m, shard, skipped) for v in range(m.views)]
    got = [(str(it.sample_id), int(it.view)) for it in items]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ValueError(f"shard {shard} needs {len(want)} items (query-major, view-minor, skipped left out); "
                         f"got {len(got)}, first difference at item {first}: "
                         f"got {got[first] if first < len(got) else None}, expected {want[first] if first < len(want) else None}")
    hidden, scales, token_ids, keeps, icd_ids = [], [], [], [], []
    for it in items:
        ids = np.asarray(it.token_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) == 0:
            raise ValueError(f"item ({it.sample_id}, {it.view}): token_ids must be a non-empty 1-D integer array, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        keep = np.ones(len(ids), bool) if it.keep is None else np.asarray(it.keep, bool)
        if keep.shape != ids.shape:
            raise ValueError(f"item ({it.sample_id}, {it.view}): keep has shape {keep.shape}, token_ids {ids.shape}")
        h = _stored_values(it.hidden, layout.values_dtype(m.dtype), f"item ({it.sample_id}, {it.view})")
        if m.dtype == "int8":
            h, scale = layout.quantize(h)
            scales.append(scale)
        if h.shape != (int(keep.sum()), m.n_layers, m.d_model):
            raise ValueError(f"item ({it.sample_id}, {it.view}): hidden has shape {tuple(h.shape)}, "
                             f"expected {(int(keep.sum()), m.n_layers, m.d_model)} [kept tokens, layers, d]")
        hidden.append(h)
        keeps.append(keep.astype("u1"))
        token_ids.append(ids.astype("<i4"))
        icd_ids.append([str(c) for c in it.icd_ids])
    lengths = [len(t) for t in token_ids]
    stored = layout.STORED_DTYPE[m.dtype]
    groups = (m.n_layers, layout.quant_groups(m.d_model))
    scale = {layout.SCALE: layout.Rows(scales, groups, np.dtype("<f4"))} if m.dtype == "int8" else {}
    return {**_logit_arrays(m, items, lengths), **scale,
        "hidden": layout.Rows(hidden, (m.n_layers, m.d_model), stored),  # [K, L, d], K = kept tokens
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype("<i8"),
        "token_ids": np.concatenate(token_ids) if token_ids else np.zeros(0, "<i4"),
        "keep": np.concatenate(keeps) if keeps else np.zeros(0, "u1"),
        "sample_ids": np.array([q for q, _ in want], dtype=object),
        "icd_offsets": np.concatenate([[0], np.cumsum([len(c) for c in icd_ids])]).astype("<i8"),
        "icd_ids": np.array([c for cs in icd_ids for c in cs], dtype=object),
    }


def _logit_arrays(m: Manifest, items: list[Item], lengths: list[int]) -> dict[str, np.ndarray]:
    """The reserved arrays of the items' logits: every item has them when the store holds them, none otherwise."""
    setting = layout.logits_setting(m)
    if setting is None:
        if any(it.logits is not None for it in items):
            raise ValueError("items carry logits, but the manifest's fingerprint_fields.logits says the store holds none")
        return {}
    if m.dtype == "int8":
        raise ValueError("an int8 store holds no logits (PROTOCOL.md, 8-bit targets); store them in a float dtype")
    k = setting[1]
    pos, ids, values, lse = [], [], [], []
    for it, n in zip(items, lengths):
        where = f"item ({it.sample_id}, {it.view})"
        lg = it.logits
        if lg is None:
            raise ValueError(f"{where}: the store holds logits ({m.fingerprint_fields['logits']}); the item has none")
        p = np.asarray(lg.pos).astype("<i4")
        v = _stored_values(lg.values, m.dtype, f"{where} logits")
        if p.ndim != 1 or v.shape[:1] != p.shape or (k and v.shape[1] != k) or ((p < 0) | (p >= n - 1)).any():
            raise ValueError(f"{where}: logits of shape {tuple(v.shape)} at positions {p.tolist()} do not fit "
                             f"{m.fingerprint_fields['logits']} and a span of {n} tokens")
        if k and np.shape(lg.ids) != v.shape:
            raise ValueError(f"{where}: logit ids of shape {np.shape(lg.ids)}, logits {tuple(v.shape)}")
        pos.append(p)
        values.append(v)
        lse.append(np.asarray(lg.lse, dtype="<f4").reshape(len(p)))
        if k:
            ids.append(np.asarray(lg.ids).astype("<i4"))
    width = k or (values[0].shape[1] if values else 0)
    if any(v.shape[1] != width for v in values):
        raise ValueError(f"the items' full logits differ in width: {sorted({v.shape[1] for v in values})}")
    stored = layout.STORED_DTYPE[m.dtype]
    arrays = {"logit_offsets": np.concatenate([[0], np.cumsum([len(p) for p in pos])]).astype("<i8"),
              "logit_pos": np.concatenate(pos) if pos else np.zeros(0, "<i4"),
              "logits": layout.Rows(values, (width,), stored),
              "logit_lse": np.concatenate(lse) if lse else np.zeros(0, "<f4")}
    if k:
        arrays["logit_ids"] = np.concatenate(ids) if ids else np.zeros((0, k), "<i4")
    return arrays


def _stored_values(hidden, dtype: str, where: str) -> np.ndarray:
    """The values as stored: the manifest dtype, bfloat16 as its uint16 bit pattern. No casting:
    the dtype is part of the fingerprint, so a mismatch is a bug in the caller."""
    # torch is looked up, not imported: if the caller never imported it, `hidden` is no tensor, and
    # tools that only write numpy (or only inspect stores) do not pay torch's import time.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(hidden, torch.Tensor):
        if hidden.dtype != getattr(torch, dtype):
            raise ValueError(f"{where}: hidden is {hidden.dtype}, the store holds {dtype}")
        hidden = hidden.detach().cpu().contiguous()
        if dtype == "bfloat16":
            return hidden.view(torch.int16).numpy().view(np.uint16).astype("<u2", copy=False)
        return hidden.numpy().astype(layout.STORED_DTYPE[dtype], copy=False)
    hidden = np.asarray(hidden)
    if hidden.dtype.str[1:] != layout.STORED_DTYPE[dtype].str[1:]:  # same kind and size, any byte order
        raise ValueError(f"{where}: hidden is numpy {hidden.dtype}, the store holds {dtype}"
                         f"{' (pass a torch.bfloat16 tensor or its uint16 bits)' if dtype == 'bfloat16' else ''}")
    return hidden.astype(layout.STORED_DTYPE[dtype], copy=False)
