"""The store manifest: what determines the targets, and the shard arithmetic derived from it.

This dataclass is the single source of the manifest schema; `PROTOCOL.md` documents it field by
field, and a test compares that table with the fields here.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata

from storage.errors import StoreError, StoreMismatch

FORMAT_VERSION = 4  # the newest this code reads and writes: 4 added int8 values (PROTOCOL.md, Versioning)
OLDEST_FORMAT_VERSION = 3  # 3: flat chunk keys, CRC-32 checksums, reserved logits arrays
DTYPES = ("float32", "float16", "bfloat16", "int8")
# Fields that change from run to run without changing the targets: excluded from the fingerprint,
# from diff() and from "identical store" comparisons.
VOLATILE = ("created_at", "created_by")
PACKAGE = "mimic-pipeline"


def format_version(dtype: str) -> int:
    """The format a store of `dtype` values is written in: 4 for int8, which a version-3 reader cannot read;
    3 for the float dtypes, whose stores version 4 left as they were (and so their fingerprints)."""
    return 4 if dtype == "int8" else OLDEST_FORMAT_VERSION


def canonical_json(obj) -> bytes:
    """The one byte encoding that fingerprints and string checksums hash (see PROTOCOL.md)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


@dataclass(frozen=True)
class Manifest:
    """Everything that determines a store's targets, written once before any shard.

    format_version: on-disk format of the store (format_version(dtype) when written by this code).
    fingerprint_fields: opaque JSON object from the teacher (model, processor, prompt, task, split,
        shots, sampler, seed, span, capture point, ...); storage only hashes and compares it.
    query_ids: the ordered query list; shard i holds queries [i*shard_size, (i+1)*shard_size).
    views: V, independent ICD draws stored per query.
    shard_size: queries per shard (the last shard may hold fewer).
    n_layers, d_model: the L and d of every hidden [t, L, d] block.
    dtype: dtype of the hidden states ("float32", "float16", "bfloat16", or "int8": 8-bit with scales, PROTOCOL.md).
    created_at, created_by: volatile (see creation_stamp); informational only.
    """

    format_version: int
    fingerprint_fields: dict
    query_ids: tuple[str, ...]
    views: int
    shard_size: int
    n_layers: int
    d_model: int
    dtype: str
    created_at: str = ""
    created_by: str = ""

    def __post_init__(self):
        # Normalise so that a manifest equals its own JSON round trip (tuples become lists, etc.).
        try:
            fields = json.loads(canonical_json(self.fingerprint_fields))
        except (TypeError, ValueError) as e:
            raise StoreError(f"manifest fingerprint_fields are not plain JSON: {e}") from None
        if not isinstance(fields, dict):
            raise StoreError(f"manifest fingerprint_fields must be a JSON object, got {type(fields).__name__}")
        object.__setattr__(self, "fingerprint_fields", fields)
        if isinstance(self.query_ids, (str, bytes, dict)) or not hasattr(self.query_ids, "__iter__"):
            raise StoreError(f"manifest query_ids must be a list of ids, got {type(self.query_ids).__name__}")
        object.__setattr__(self, "query_ids", tuple(str(q) for q in self.query_ids))
        for name in ("format_version", "views", "shard_size", "n_layers", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StoreError(f"manifest field {name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise StoreError(f"manifest dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "int8" and self.format_version < format_version("int8"):  # older formats hold floats only
            raise StoreError(f"a store of {self.dtype} values needs format version {format_version(self.dtype)}, "
                             f"the manifest says {self.format_version}")
        if len(set(self.query_ids)) != len(self.query_ids):
            dup, n = Counter(self.query_ids).most_common(1)[0]
            raise StoreError(f"query ids must be unique; {dup!r} appears {n} times")

    # -- identity ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        d = self.to_dict()
        d["query_ids"] = list(self.query_ids)
        return json.dumps(d, indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse manifest.json; raises StoreError for malformed JSON or missing/unknown fields."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise StoreError(f"manifest.json is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise StoreError("manifest.json must hold a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - d.keys()):
            raise StoreError(f"manifest.json lacks field(s) {', '.join(missing)}; the store is damaged or not ours")
        if unknown := sorted(d.keys() - names):
            raise StoreError(f"manifest.json has unknown field(s) {', '.join(unknown)}; upgrade mimic-pipeline")
        return cls(**d)

    @functools.cached_property  # hashing every query id is not free, and markers check it often
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of every non-volatile field."""
        d = {k: v for k, v in self.to_dict().items() if k not in VOLATILE}
        d["query_ids"] = list(self.query_ids)
        return hashlib.sha256(canonical_json(d)).hexdigest()

    def diff(self, other: Manifest) -> list[str]:
        """One line per differing non-volatile field; `self` is the store, `other` the config."""
        lines = []
        for name, mine, theirs in _flat_fields(self, other):
            if name == "query_ids":
                if mine != theirs:
                    lines.append(_query_diff(mine, theirs))
            elif mine != theirs:
                lines.append(f"{name}: store has {_show(mine)}, config has {_show(theirs)}")
        return lines

    # -- shard arithmetic (depends only on the query list and shard_size, never on ranks) -------
    @property
    def n_queries(self) -> int:
        return len(self.query_ids)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_queries / self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Query-index range [lo, hi) of a shard."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range: the store has {self.n_shards} shards")
        lo = shard * self.shard_size
        return lo, min(lo + self.shard_size, self.n_queries)

    def shard_of(self, query_index: int) -> int:
        """The shard that holds query `query_index`."""
        if not 0 <= query_index < self.n_queries:
            raise IndexError(f"query index {query_index} out of range [0, {self.n_queries})")
        return query_index // self.shard_size


def creation_stamp() -> dict[str, str]:
    """created_at and created_by of a manifest made now: ISO 8601 UTC time, and "<package> <version> on <host>"."""
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # run from a source tree that pip never installed
        version = "(version unknown)"
    return {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": f"{PACKAGE} {version} on {socket.gethostname()}"}


def shard_owner(shard: int, world_size: int) -> int:
    """The rank that writes `shard` when `world_size` ranks share the work (round robin)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return shard % world_size


def ensure_same(stored: Manifest, wanted: Manifest, url: str, fix: str) -> None:
    """Raise StoreMismatch naming each differing field unless the fingerprints are equal."""
    if stored.fingerprint == wanted.fingerprint:
        return
    lines = stored.diff(wanted) or ["(fingerprints differ, yet no field does: the store is damaged)"]
    raise StoreMismatch(f"store {url} was made with another configuration:", lines, fix)


def _flat_fields(a: Manifest, b: Manifest):
    """(name, a value, b value) for every non-volatile field; fingerprint_fields flattened to key paths."""
    for f in dataclasses.fields(Manifest):
        if f.name in VOLATILE:
            continue
        if f.name == "fingerprint_fields":
            fa, fb = _flatten(a.fingerprint_fields), _flatten(b.fingerprint_fields)
            for key in sorted(fa.keys() | fb.keys()):
                yield key, fa.get(key, _ABSENT), fb.get(key, _ABSENT)
        else:
            yield f.name, getattr(a, f.name), getattr(b, f.name)


class _Absent:
    def __repr__(self):
        return "nothing"


_ABSENT = _Absent()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _show(value, limit: int = 80) -> str:
    text = repr(value) if isinstance(value, (str, _Absent)) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _query_diff(mine: tuple[str, ...], theirs: tuple[str, ...]) -> str:
    first = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
    where = (f"first difference at position {first}: store has {_show(mine[first]) if first < len(mine) else 'nothing'}, "
             f"config has {_show(theirs[first]) if first < len(theirs) else 'nothing'}")
    return f"query_ids: store has {len(mine)} ids, config has {len(theirs)}; {where}"
