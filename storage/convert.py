"""A store in another value dtype, without rerunning the teacher: `pipeline cache convert SRC DST --dtype int8`.

Each value is rounded from the source's, as the teacher rounds its model's outputs (PROTOCOL.md, What the values
are); from a float32 store the result is the store the teacher writes with that teacher.store_dtype, bit for bit
and with the same fingerprint. From a bfloat16 store to int8 the values are rounded twice (at most half a
bfloat16 step more error than the teacher's own int8 store); the fingerprint cannot tell, so say so where it matters.
"""
from __future__ import annotations

import dataclasses

import torch

from storage import layout
from storage._root import Root
from storage.errors import StoreError
from storage.manifest import creation_stamp, format_version
from storage.reader import read_items
from storage.writer import open_for_write


def convert(src: str, dst: str, dtype: str, progress=lambda shards: shards) -> str:
    """Write every published shard of `src` into the store `dst` with values in `dtype`; returns dst's
    fingerprint. Resumable: shards dst has already are left as they are (the writer never overwrites one)."""
    m = layout.open_manifest(src)
    if dtype == m.dtype:
        raise StoreError(f"store {src} holds {dtype} already; nothing to convert")
    if layout.logits_setting(m) is not None and dtype == "int8":
        raise StoreError(f"store {src} holds teacher logits, which an int8 store cannot (PROTOCOL.md, 8-bit targets)")
    target = dataclasses.replace(m, dtype=dtype, format_version=format_version(dtype), **creation_stamp())
    writer = open_for_write(dst, target)
    markers, _ = layout.load_markers(Root(src), m)
    values_dtype = getattr(torch, layout.values_dtype(dtype))
    for shard in progress(sorted(set(markers) - writer.published())):
        items = [dataclasses.replace(it, hidden=it.hidden.to(values_dtype), logits=it.logits and dataclasses.replace(
                     it.logits, values=it.logits.values.to(values_dtype))) for it in read_items(src, shards=[shard])]
        writer.write_shard(shard, items, markers[shard].skipped)
    return target.fingerprint
