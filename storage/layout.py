"""The on-disk layout of PROTOCOL.md: names, the per-shard marker, and the shard arrays.

Shared by the writer, the reader and `inspection`; it needs numpy and zarr but not torch.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass

import numpy as np

from storage._root import Root
from storage.errors import StoreError
from storage.manifest import FORMAT_VERSION, OLDEST_FORMAT_VERSION, Manifest, canonical_json

MANIFEST = "manifest.json"
PUBLISHED = "published"     # one marker per published shard: published/000012.json
SHARDS = "shards"           # one data directory per write attempt: shards/000012-<16 hex>/
ARRAYS = ("hidden", "offsets", "token_ids", "keep", "sample_ids", "icd_offsets", "icd_ids")
# The optional teacher logits that LIVE trains on (PROTOCOL.md, "Reserved: logits"): a shard has them exactly
# when the manifest's fingerprint_fields.logits is topk:K (all five) or full (all but logit_ids).
RESERVED = ("logit_offsets", "logit_pos", "logit_ids", "logits", "logit_lse")
# 8-bit targets (manifest dtype int8): `hidden` holds q, and `hidden_scale` one float32 s per row, layer and group
# of QUANT_GROUP values, the values being q * s (PROTOCOL.md, "8-bit targets"). A shard has it exactly when the
# store is int8. Groups, not one scale per vector: a single large value (LLMs' "massive activations" are ~1000x
# the rest) would otherwise round every other value of its vector to 0.
SCALE = "hidden_scale"
QUANT_GROUP = 128
DIMS = {"hidden": ("row", "layer", "hidden"), "offsets": ("item_edge",), "token_ids": ("token",), "keep": ("token",),
        "sample_ids": ("item",), "icd_offsets": ("item_edge",), "icd_ids": ("icd",),
        "logit_offsets": ("item_edge",), "logit_pos": ("logit_row",), "logit_ids": ("logit_row", "logit_k"),
        "logits": ("logit_row", "logit_k"), "logit_lse": ("logit_row",), SCALE: ("row", "layer", "group")}
# Stored numpy dtype per manifest dtype; bfloat16 has no zarr/numpy dtype, so its raw bit pattern
# is stored as little-endian uint16 (bit-exact, and readable by anything that can reinterpret bits).
STORED_DTYPE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1")}
INT8_MAX = 127  # q in [-127, 127]: symmetric, so -x quantizes to -q


def values_dtype(dtype: str) -> str:
    """The dtype of the values a writer takes, and readers return, for a store of `dtype`: an int8 store takes
    float32 values (it quantizes them) and gives back q * s in float32."""
    return "float32" if dtype == "int8" else dtype


_MARKER_NAME = re.compile(r"^(\d{6,})\.json$")
_DATA_NAME = re.compile(r"^(\d{6,})-[0-9a-f]{16}$")


def logits_setting(manifest: Manifest) -> tuple[str, int | None] | None:
    """The store's teacher logits: ("topk", K), ("full", None), or None when it holds none."""
    value = manifest.fingerprint_fields.get("logits")
    if value == "full":
        return "full", None
    if isinstance(value, str) and value.startswith("topk:") and value[5:].isdigit():
        return "topk", int(value[5:])
    return None


def logit_arrays(manifest: Manifest) -> tuple[str, ...]:
    """The reserved arrays every shard of this store has (none without logits)."""
    setting = logits_setting(manifest)
    return () if setting is None else tuple(n for n in RESERVED if n != "logit_ids" or setting[0] == "topk")


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
    if version < OLDEST_FORMAT_VERSION:
        shots = (json.loads(raw).get("fingerprint_fields") or {}).get("shots", "K")
        raise StoreError(f"store {root.url} has format version {version}, this reader reads versions "
                         f"{OLDEST_FORMAT_VERSION} to {FORMAT_VERSION} only; "
                         f"rebuild it with `pipeline run teacher --shots {shots} --store NEW_PATH` and the config that made it")
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
    crc32: array name -> CRC-32 (zlib's) of its canonical bytes, 8 lowercase hex digits.
    """

    shard: int
    fingerprint: str
    data: str
    tokens: int
    skipped: dict
    crc32: dict

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
        if (not isinstance(marker.skipped, dict) or not isinstance(marker.crc32, dict)
                or not set(ARRAYS) <= set(marker.crc32) <= set(ARRAYS + RESERVED + (SCALE,))
                or not isinstance(marker.tokens, int)):
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


class Rows:
    """`hidden` as the items' blocks of rows, in order, never concatenated: the writer writes them one
    after the other into the chunk file, since copying a shard costs about as much as writing it."""

    def __init__(self, blocks: list[np.ndarray], row_shape: tuple[int, ...], dtype):
        self.blocks, self.dtype = blocks, np.dtype(dtype)
        self.shape = (sum(len(b) for b in blocks), *row_shape)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))


def _le_bytes(values: np.ndarray) -> list[memoryview]:
    """An array's (or Rows') C-order little-endian bytes, as buffers without a copy."""
    blocks = values.blocks if isinstance(values, Rows) else [values]
    # memoryview cannot cast an empty array (a shard whose queries were all skipped)
    return [memoryview(np.ascontiguousarray(b, dtype=b.dtype.newbyteorder("<"))).cast("B") for b in blocks if b.size]


def checksum(values: np.ndarray | Rows) -> str:
    """CRC-32 (zlib.crc32, the IEEE polynomial) of an array's canonical bytes: C-order little-endian
    values, or for string arrays the canonical JSON list of the strings; 8 lowercase hex digits.

    CRC-32 rather than sha256: it guards against torn or flipped bytes, the failures a store meets,
    at 2-3x sha256's speed with no copy (BENCHMARKS.md, P4); nobody forges a target store.
    """
    if values.dtype.kind in "OTU":
        return f"{zlib.crc32(canonical_json([str(v) for v in values.tolist()])):08x}"
    crc = 0
    for part in _le_bytes(values):
        crc = zlib.crc32(part, crc)
    return f"{crc:08x}"


def chunk_rel(name: str, ndim: int) -> str:
    """The one chunk file of an array, relative to its shard's data directory: chunk key encoding v2
    with "." (hidden/0.0.0, offsets/0), so that it sits next to the array's zarr.json."""
    return f"{name}/{'.'.join('0' * ndim)}"


def _array_json(name: str, shape: tuple[int, ...], dtype, value_dtype: str) -> bytes:
    """The zarr.json of one shard array (Zarr v3, one uncompressed chunk), as zarr 3 writes it."""
    is_str = dtype.kind in "OTU"
    codec = {"name": "vlen-utf8", "configuration": {}} if is_str else {"name": "bytes", "configuration": {"endian": "little"}}
    meta = {"zarr_format": 3, "node_type": "array", "shape": list(shape),
            "data_type": "string" if is_str else np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n) for n in shape]}},
            "chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}},
            "fill_value": "" if is_str else 0, "codecs": [codec],
            "attributes": {"value_dtype": value_dtype} if name in ("hidden", "logits", SCALE) else {},
            "dimension_names": list(DIMS[name]), "storage_transformers": []}
    return json.dumps(meta, indent=1).encode("utf-8")


def _vlen_utf8(values: np.ndarray) -> bytes:
    """Zarr's vlen-utf8 chunk encoding: uint32 count, then per string its uint32 byte length and UTF-8 bytes."""
    encoded = [str(v).encode("utf-8") for v in values.tolist()]
    parts = [len(encoded).to_bytes(4, "little")]
    for e in encoded:
        parts += [len(e).to_bytes(4, "little"), e]
    return b"".join(parts)


def _from_vlen_utf8(raw: np.ndarray) -> np.ndarray:
    buf, strings, pos = raw.tobytes(), [], 4
    for _ in range(int.from_bytes(buf[:4], "little")):
        n = int.from_bytes(buf[pos:pos + 4], "little")
        strings.append(buf[pos + 4:pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    if pos != len(buf):
        raise ValueError(f"string chunk of {len(buf)} bytes holds {pos}")
    return np.array(strings, dtype=object)


def write_arrays(root: Root, rel: str, arrays: dict[str, np.ndarray | Rows], value_dtype: str) -> None:
    """Write the Zarr v3 group `rel`: one uncompressed whole-array chunk per array.

    The files (each array's chunk and zarr.json, the group's zarr.json) are written directly, not
    through zarr: zarr's write path costs more than the bytes themselves at these sizes (BENCHMARKS.md,
    P4); tests read the result back with zarr. An empty array has no chunk file, as zarr leaves it.
    """
    names = [n for n in ARRAYS + RESERVED + (SCALE,) if n in arrays]
    for name in names:
        root.makedirs(f"{rel}/{name}")
    # `hidden` first: its fsync, by far the longest, then runs while the small files are written.
    for name in sorted(names, key=lambda n: n != "hidden"):
        values = arrays[name]
        if values.size:
            parts = [_vlen_utf8(values)] if values.dtype.kind in "OTU" else _le_bytes(values)
            root.write(f"{rel}/{chunk_rel(name, values.ndim)}", parts)
        root.write(f"{rel}/{name}/zarr.json", _array_json(name, values.shape, values.dtype, value_dtype))
    root.write(f"{rel}/zarr.json", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())


def read_arrays(root: Root, marker: Marker) -> dict[str, np.ndarray]:
    """The shard's arrays, whole, through zarr (the reference path: `verify` uses it, so a store that
    zarr cannot read, or whose layout the direct reads below would misread, is caught there)."""
    try:
        group = root.open_group(marker.data, mode="r")
    except Exception as e:  # zarr raises several types for a missing or damaged group
        raise StoreError(f"shard {marker.shard}: cannot open {marker.data}: {type(e).__name__}: {e}") from None
    arrays = {}
    for name in marker.crc32:
        try:
            array = group[name]
            arrays[name] = array[...]
        except Exception as e:
            raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/{name}: {type(e).__name__}: {e}") from None
        if (array.compressors or array.filters or array.chunks != tuple(max(1, n) for n in array.shape)
                or array.metadata.chunk_key_encoding.to_dict() != {"name": "v2", "configuration": {"separator": "."}}):
            raise StoreError(f"shard {marker.shard}: {marker.data}/{name} is not one uncompressed chunk with the "
                             "chunk key encoding v2 \".\" (PROTOCOL.md, Shard data); the store was not written by this format")
    return arrays


def read_meta(root: Root, manifest: Manifest, marker: Marker) -> dict[str, np.ndarray]:
    """Every array of a shard but `hidden`, read directly from its chunk file, and in place of `hidden`
    an empty stand-in with the shape and dtype its chunk file holds (no data read)."""
    arrays = {}
    for name in ARRAYS:
        if name == "hidden":
            continue
        path = f"{marker.data}/{chunk_rel(name, 1)}"
        try:
            raw = root.read(path)
            if raw is None:  # an empty array has no chunk; a non-empty one is caught by check_arrays' shapes
                raw = b"\0\0\0\0" if name in ("sample_ids", "icd_ids") else b""
            raw = np.frombuffer(raw, np.uint8)
            arrays[name] = _from_vlen_utf8(raw) if name in ("sample_ids", "icd_ids") else raw.view(_META_DTYPE[name])
        except ValueError as e:
            raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/{name}: {e}") from None
    stored, row = STORED_DTYPE[manifest.dtype], manifest.n_layers * manifest.d_model
    size = root.size(f"{marker.data}/{chunk_rel('hidden', 3)}")
    if size % (row * stored.itemsize):
        raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/hidden: {size} bytes is no whole number of rows")
    n_rows = size // (row * stored.itemsize)
    arrays["hidden"] = np.broadcast_to(np.zeros((), stored), (n_rows, manifest.n_layers, manifest.d_model))
    if SCALE in marker.crc32:  # its stand-in too: read per item, by read_rows
        row = manifest.n_layers * quant_groups(manifest.d_model) * 4
        size = root.size(f"{marker.data}/{chunk_rel(SCALE, 3)}") if n_rows else 0
        arrays[SCALE] = np.broadcast_to(np.zeros((), "<f4"), (size // row, manifest.n_layers, quant_groups(manifest.d_model)))
    if names := logit_arrays(manifest):
        arrays |= _read_logit_meta(root, manifest, marker, names)
    return arrays


def _read_logit_meta(root: Root, manifest: Manifest, marker: Marker, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The small reserved arrays (offsets, positions, logsumexp), and for `logits` and `logit_ids` stand-ins with
    the shapes their chunk files hold (no data read): those are read per item, by read_logit_rows."""
    arrays = {}
    for name in ("logit_offsets", "logit_pos", "logit_lse"):
        raw = root.read(f"{marker.data}/{chunk_rel(name, 1)}")
        arrays[name] = np.frombuffer(raw or b"", np.uint8).view(_META_DTYPE[name])
    n_rows = len(arrays["logit_pos"])
    for name in [n for n in ("logit_ids", "logits") if n in names]:
        itemsize = (STORED_DTYPE[manifest.dtype] if name == "logits" else _META_DTYPE[name]).itemsize
        size = root.size(f"{marker.data}/{chunk_rel(name, 2)}") if n_rows else 0
        width = size // (n_rows * itemsize) if n_rows else logits_setting(manifest)[1] or 0
        if n_rows and size % (n_rows * itemsize):
            raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/{name}: {size} bytes is no whole number of rows")
        dtype = STORED_DTYPE[manifest.dtype] if name == "logits" else _META_DTYPE[name]
        arrays[name] = np.broadcast_to(np.zeros((), dtype), (n_rows, width))
    return arrays


def read_logit_rows(root: Root, manifest: Manifest, marker: Marker, lo: int, hi: int, width: int):
    """Rows [lo, hi) of a shard's `logit_ids` (None for a full store) and `logits` ([hi - lo, width], stored dtype):
    one byte-range read of each chunk, as read_rows does for `hidden`."""
    out = []
    for name in ("logit_ids", "logits"):
        if name == "logit_ids" and logits_setting(manifest)[0] != "topk":
            out.append(None)
            continue
        dtype = STORED_DTYPE[manifest.dtype] if name == "logits" else _META_DTYPE[name]
        row = width * dtype.itemsize
        try:
            raw = root.read_range(f"{marker.data}/{chunk_rel(name, 2)}", lo * row, hi * row) if hi > lo else np.zeros(0, np.uint8)
        except StoreError as e:
            raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/{name}: {e}") from None
        out.append(raw.view(dtype).reshape(hi - lo, width))
    return tuple(out)


_META_DTYPE = {"offsets": np.dtype("<i8"), "token_ids": np.dtype("<i4"), "keep": np.dtype("u1"), "icd_offsets": np.dtype("<i8"),
               "logit_offsets": np.dtype("<i8"), "logit_pos": np.dtype("<i4"), "logit_ids": np.dtype("<i4"),
               "logit_lse": np.dtype("<f4")}


def read_rows(root: Root, manifest: Manifest, marker: Marker, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a shard's `hidden`, [hi - lo, L, d]: one byte-range read of its uncompressed
    C-order chunk, whose row r starts at byte r * L * d * itemsize. In the stored dtype, except for an
    int8 store: there the values q * s in float32 (a second, small range read, of `hidden_scale`)."""
    stored = STORED_DTYPE[manifest.dtype]
    row = manifest.n_layers * manifest.d_model * stored.itemsize
    names = ("hidden", SCALE) if manifest.dtype == "int8" else ("hidden",)
    groups = quant_groups(manifest.d_model)
    try:
        raw = [root.read_range(f"{marker.data}/{chunk_rel(name, 3)}", lo * size, hi * size)
               for name, size in zip(names, (row, manifest.n_layers * groups * 4))]
    except StoreError as e:
        raise StoreError(f"shard {marker.shard}: cannot read {marker.data}/{names[-1]}: {e}") from None
    values = raw[0].view(stored).reshape(hi - lo, manifest.n_layers, manifest.d_model)
    return values if len(raw) == 1 else dequantize(values, raw[1].view("<f4").reshape(hi - lo, manifest.n_layers, groups))


def quant_groups(d: int) -> int:
    """Groups of QUANT_GROUP consecutive values in a vector of d (one group if QUANT_GROUP does not divide d)."""
    return d // QUANT_GROUP if d % QUANT_GROUP == 0 else 1


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., d] -> (int8 q [..., d], float32 s [..., G]), G = quant_groups(d): per group of values,
    s = max |x| / 127, q = x / s rounded to the nearest integer, ties to even (0 and s = 0 for all zeros)."""
    values = np.asarray(values, np.float32)
    grouped = values.reshape(*values.shape[:-1], quant_groups(values.shape[-1]), -1)
    scale = (np.abs(grouped).max(axis=-1) / np.float32(INT8_MAX)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint(grouped / scale[..., None])
    q = np.where(scale[..., None] > 0, q, 0)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8).reshape(values.shape), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q * s in float32 ([..., d] and [..., G]): the values an int8 store holds."""
    grouped = q.reshape(*q.shape[:-1], scale.shape[-1], -1).astype(np.float32)
    return (grouped * scale.astype(np.float32)[..., None]).reshape(q.shape)


def check_arrays(manifest: Manifest, marker: Marker, arrays: dict[str, np.ndarray], *, checksums: bool) -> list[str]:
    """Problems of one shard's arrays against the manifest and its marker (empty list = consistent)."""
    where = f"shard {marker.shard} ({marker.data})"
    n_items = len(kept_queries(manifest, marker.shard, marker.skipped)) * manifest.views
    offsets, keep = arrays["offsets"], arrays["keep"]
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
    problems += _logit_problems(manifest, marker, arrays, where) + _scale_problems(manifest, marker, arrays, where)
    if checksums:
        for name in marker.crc32:
            if checksum(arrays[name]) != marker.crc32[name]:
                problems.append(f"{where}: {name} does not match its checksum (corrupted or truncated data)")
    return problems


def _scale_problems(manifest: Manifest, marker: Marker, arrays: dict[str, np.ndarray], where: str) -> list[str]:
    """`hidden_scale`: present exactly in an int8 store, one finite, non-negative float32 per row, layer and group."""
    int8 = manifest.dtype == "int8"
    if (SCALE in marker.crc32) != int8:
        return [f"{where}: {'lacks' if int8 else 'has'} {SCALE}, which a{'n int8' if int8 else f' {manifest.dtype}'} "
                "store's shards " + ("have" if int8 else "do not have")]
    if not int8:
        return []
    scale, want = arrays[SCALE], (len(arrays["hidden"]), manifest.n_layers, quant_groups(manifest.d_model))
    if scale.shape != want or scale.dtype != np.dtype("<f4"):
        return [f"{where}: {SCALE} has shape {scale.shape} and dtype {scale.dtype}, expected {want} float32"]
    if scale.size and not (np.isfinite(scale) & (scale >= 0)).all():
        return [f"{where}: {SCALE} holds a negative or non-finite scale"]
    return []


def _logit_problems(manifest: Manifest, marker: Marker, arrays: dict[str, np.ndarray], where: str) -> list[str]:
    """Problems of a shard's reserved arrays: present exactly when the manifest says the store holds logits, with
    one row per answer position of each item (a span position t with a next token, t + 1 < the item's length)."""
    names, setting = logit_arrays(manifest), logits_setting(manifest)
    if sorted(n for n in marker.crc32 if n in RESERVED) != sorted(names):
        return [f"{where}: has the logit arrays {sorted(n for n in marker.crc32 if n in RESERVED)}, the manifest's "
                f"logits setting ({manifest.fingerprint_fields.get('logits', 'off')}) needs {sorted(names)}"]
    if not names:
        return []
    off, pos = arrays["logit_offsets"], arrays["logit_pos"]
    n_rows = len(pos)
    expect = {"logit_offsets": ((len(arrays["offsets"]),), np.dtype("<i8")), "logit_pos": ((n_rows,), np.dtype("<i4")),
              "logit_lse": ((n_rows,), np.dtype("<f4")),
              "logits": ((n_rows, setting[1] or arrays["logits"].shape[1]), STORED_DTYPE[manifest.dtype]),
              "logit_ids": ((n_rows, setting[1]), np.dtype("<i4"))}
    problems = [f"{where}: {name} has shape {arrays[name].shape} and dtype {arrays[name].dtype}, expected {shape} {dtype}"
                for name, (shape, dtype) in expect.items() if name in names
                and (arrays[name].shape != shape or arrays[name].dtype != dtype)]
    if problems:
        return problems
    if off[0] != 0 or off[-1] != n_rows or (np.diff(off) < 0).any():
        return [f"{where}: logit_offsets must rise from 0 to {n_rows}; got {_brief(off)}"]
    span_len = np.repeat(np.diff(arrays["offsets"]), np.diff(off))
    if ((pos < 0) | (pos >= span_len - 1)).any():
        return [f"{where}: logit_pos holds a position without a next token in its item's span"]
    return []


def _brief(a: np.ndarray, n: int = 6) -> str:
    values = a.tolist()
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ...] ({len(values)} values)"
