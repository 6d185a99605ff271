"""The on-disk layout of PROTOCOL.md: names, the per-shard marker, and the shard arrays.

Shared by the writer, the reader and `inspection`; it needs numpy and zarr but not torch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from storage._root import Root
from storage.errors import StoreError
from storage.manifest import FORMAT_VERSION, Manifest, canonical_json

MANIFEST = "manifest.json"
PUBLISHED = "published"     # one marker per published shard: published/000012.json
SHARDS = "shards"           # one data directory per write attempt: shards/000012-<16 hex>/
ARRAYS = ("hidden", "offsets", "token_ids", "keep", "sample_ids", "icd_offsets", "icd_ids")
# Stored numpy dtype per manifest dtype; bfloat16 has no zarr/numpy dtype, so its raw bit pattern
# is stored as little-endian uint16 (bit-exact, and readable by anything that can reinterpret bits).
STORED_DTYPE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_MARKER_NAME = re.compile(r"^(\d{6,})\.json$")
_DATA_NAME = re.compile(r"^(\d{6,})-[0-9a-f]{16}$")


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def marker_rel(shard: int) -> str:
    return f"{PUBLISHED}/{shard_name(shard)}.json"


def open_manifest(url: str) -> Manifest:
    """Read a store's manifest; StoreError if there is no store or its format is newer than ours."""
    return read_manifest(Root(url))


def read_manifest(root: Root) -> Manifest:
    raw = root.read(MANIFEST)
    if raw is None:
        raise StoreError(f"no store at {root.url}: {MANIFEST} is missing (a teacher run creates it)")
    try:
        version = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):
        raise StoreError(f"{root.url}/{MANIFEST} is not a JSON object; the store is damaged") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"{root.url}/{MANIFEST} has no valid format_version ({version!r}); the store is damaged or not ours")
    if version > FORMAT_VERSION:
        raise StoreError(f"store format version {version} is newer than this reader ({FORMAT_VERSION}); "
                         f"upgrade mimic-pipeline to read {root.url}")
    if version < FORMAT_VERSION:
        raise StoreError(f"store {root.url} has format version {version}, this reader reads {FORMAT_VERSION} only; "
                         "rebuild it with `pipeline run teacher` into a new path")
    try:
        return Manifest.from_json(raw.decode("utf-8"))
    except StoreError as e:
        raise StoreError(f"{root.url}/{MANIFEST}: {e}") from None


# -- markers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Marker:
    """Contents of published/<shard>.json: the shard's data directory and checksums.

    shard: shard index. fingerprint: the manifest fingerprint it was written under.
    data: data directory relative to the root ("shards/000012-9f0c..."); volatile (random suffix).
    tokens: total span tokens in the shard. skipped: query id -> reason, for queries left out.
    sha256: array name -> hex digest of its canonical bytes.
    """

    shard: int
    fingerprint: str
    data: str
    tokens: int
    skipped: dict
    sha256: dict

    def to_json(self) -> bytes:
        return canonical_json(self.__dict__) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Marker:
        try:
            d = json.loads(raw)
            marker = cls(**d)
        except (ValueError, TypeError) as e:
            raise StoreError(f"{where} is not a valid shard marker ({e}); delete it to rewrite that shard") from None
        check_data_rel(marker.data, where)
        if (not isinstance(marker.skipped, dict) or not isinstance(marker.sha256, dict)
                or set(marker.sha256) != set(ARRAYS) or not isinstance(marker.tokens, int)):
            raise StoreError(f"{where} is not a valid shard marker; delete it to rewrite that shard")
        return marker


def check_data_rel(rel, where: str) -> None:
    """A data path read from a marker must name a shard directory inside the root, nothing else."""
    if not isinstance(rel, str) or rel.startswith(("/", "\\")) or "\\" in rel or ".." in rel.split("/") or ":" in rel:
        raise StoreError(f"{where} points outside the store ({rel!r}); refusing to read it")
    parts = rel.split("/")
    if len(parts) != 2 or parts[0] != SHARDS or not _DATA_NAME.match(parts[1]):
        raise StoreError(f"{where} names an unexpected data path {rel!r}; refusing to read it")


def load_markers(root: Root, manifest: Manifest) -> tuple[dict[int, Marker], list[str]]:
    """Published shards -> marker, and the problems found on the way (bad names, bad markers)."""
    markers, problems = {}, []
    for name in root.listdir(PUBLISHED):
        if name.startswith("."):
            continue  # a temporary file of a publish in progress
        m = _MARKER_NAME.match(name)
        where = f"{root.url}/{PUBLISHED}/{name}"
        if not m or int(m.group(1)) >= manifest.n_shards or name != f"{shard_name(int(m.group(1)))}.json":
            problems.append(f"{where}: not a marker of any of the {manifest.n_shards} shards")
            continue
        raw = root.read(f"{PUBLISHED}/{name}")
        if raw is None:
            continue  # removed since listed
        try:
            marker = Marker.from_json(raw, where)
        except StoreError as e:
            problems.append(str(e))
            continue
        shard = int(m.group(1))
        if marker.shard != shard or marker.data.split("/")[1].split("-")[0] != shard_name(shard):
            problems.append(f"{where} describes shard {marker.shard} ({marker.data}); delete it to rewrite shard {shard}")
        elif marker.fingerprint != manifest.fingerprint:
            problems.append(f"{where} was written for another manifest (fingerprint {marker.fingerprint[:12]}...); "
                            f"delete it to rewrite shard {shard}")
        else:
            markers[shard] = marker
    return markers, problems


def data_dirs(root: Root, shard: int | None = None) -> list[str]:
    """Data directories (published or not) of one shard or of all, as root-relative paths."""
    prefix = "" if shard is None else f"{shard_name(shard)}-"
    return [f"{SHARDS}/{n}" for n in root.listdir(SHARDS, prefix) if _DATA_NAME.match(n)]


# -- shard contents ----------------------------------------------------------------------------
def kept_queries(manifest: Manifest, shard: int, skipped) -> list[str]:
    """Query ids of a shard that have items, in query order."""
    lo, hi = manifest.shard_bounds(shard)
    return [q for q in manifest.query_ids[lo:hi] if q not in skipped]


def checksum(values: np.ndarray) -> str:
    """sha256 of an array's canonical bytes: C-order little-endian values, or for string arrays
    the canonical JSON list of the strings."""
    if values.dtype.kind in "OTU":
        return hashlib.sha256(canonical_json([str(v) for v in values.tolist()])).hexdigest()
    if values.size == 0:  # memoryview cannot cast an empty array (a shard whose queries were all skipped)
        return hashlib.sha256(b"").hexdigest()
    # A memoryview hashes the buffer in place: tobytes() would copy the whole shard first.
    return hashlib.sha256(memoryview(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))).cast("B")).hexdigest()


def write_arrays(root: Root, rel: str, arrays: dict[str, np.ndarray], value_dtype: str) -> None:
    """Create the zarr group `rel` with one whole-array chunk per array, uncompressed.

    One chunk per array per shard: a shard is written in one go (piece-wise writes are ~7x slower,
    notes/cpu_setup.md §4) and fp16 activations barely compress.
    """
    group = root.open_group(rel, mode="w-")
    dims = {"hidden": ("row", "layer", "hidden"), "offsets": ("item_edge",), "token_ids": ("token",), "keep": ("token",),
            "sample_ids": ("item",), "icd_offsets": ("item_edge",), "icd_ids": ("icd",)}
    for name in ARRAYS:
        values = arrays[name]
        is_str = values.dtype.kind in "OTU"
        array = group.create_array(
            name, shape=values.shape, dtype=str if is_str else values.dtype,
            chunks=tuple(max(1, n) for n in values.shape), compressors=None, fill_value="" if is_str else 0,
            dimension_names=dims[name], attributes={"value_dtype": value_dtype} if name == "hidden" else {},
            config={"write_empty_chunks": True})  # every non-empty array has its chunk file, even all-zero
        if values.size:
            array[...] = values


def read_arrays(root: Root, marker: Marker) -> dict[str, np.ndarray]:
    """The shard's seven arrays, whole; StoreError naming the array that cannot be read."""
    try:
        group = root.open_group(marker.data, mode="r")
    except Exception as e:  # zarr raises several types for a missing or damaged group
        raise StoreError(f"shard {marker.shard}: cannot open {marker.data}: {type(e).__name__}: {e}") from None
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = group[name][...]
        except Exception as e:
            raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/{name}: {type(e).__name__}: {e}") from None
    return arrays


def check_arrays(manifest: Manifest, marker: Marker, arrays: dict[str, np.ndarray], *, checksums: bool) -> list[str]:
    """Problems of one shard's arrays against the manifest and its marker (empty list = consistent)."""
    where = f"shard {marker.shard} ({marker.data})"
    n_items = len(kept_queries(manifest, marker.shard, marker.skipped)) * manifest.views
    hidden, offsets, token_ids, keep = arrays["hidden"], arrays["offsets"], arrays["token_ids"], arrays["keep"]
    icd_offsets, icd_ids, sample_ids = arrays["icd_offsets"], arrays["icd_ids"], arrays["sample_ids"]
    expect = {
        "hidden": ((int(keep.sum()), manifest.n_layers, manifest.d_model), STORED_DTYPE[manifest.dtype]),
        "offsets": ((n_items + 1,), np.dtype("<i8")),
        "token_ids": ((marker.tokens,), np.dtype("<i4")),
        "keep": ((marker.tokens,), np.dtype("u1")),
        "sample_ids": ((n_items,), None),
        "icd_offsets": ((n_items + 1,), np.dtype("<i8")),
        "icd_ids": ((int(icd_offsets[-1]) if len(icd_offsets) else 0,), None),
    }
    problems = []
    for name, (shape, dtype) in expect.items():
        got = arrays[name]
        if got.shape != shape:
            problems.append(f"{where}: {name} has shape {got.shape}, expected {shape}")
        if dtype is not None and got.dtype != dtype:
            problems.append(f"{where}: {name} has dtype {got.dtype}, expected {dtype}")
    if problems:
        return problems
    if (keep > 1).any():
        problems.append(f"{where}: keep must hold only 0 and 1")
    for name, off, total in (("offsets", offsets, marker.tokens), ("icd_offsets", icd_offsets, len(icd_ids))):
        steps = np.diff(off)
        if off[0] != 0 or off[-1] != total or (steps < (1 if name == "offsets" else 0)).any():
            problems.append(f"{where}: {name} must rise from 0 to {total}"
                            f"{' by at least 1 per item' if name == 'offsets' else ''}; got {_brief(off)}")
    want_ids = [q for q in kept_queries(manifest, marker.shard, marker.skipped) for _ in range(manifest.views)]
    if [str(s) for s in sample_ids.tolist()] != want_ids:
        problems.append(f"{where}: sample_ids differ from the manifest's queries minus the skipped ones")
    if checksums:
        for name in ARRAYS:
            if checksum(arrays[name]) != marker.sha256[name]:
                problems.append(f"{where}: {name} does not match its checksum (corrupted or truncated data)")
    return problems


def _brief(a: np.ndarray, n: int = 6) -> str:
    values = a.tolist()
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ...] ({len(values)} values)"
