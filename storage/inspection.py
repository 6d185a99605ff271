"""What `pipeline cache info` and `pipeline cache verify` show. Needs no torch."""
from __future__ import annotations

import hashlib

from storage import layout
from storage._root import Root
from storage.errors import StoreError
from storage.manifest import canonical_json


def info(url: str) -> dict:
    """A summary of the store: identity, completeness, size, skipped queries (reads no arrays)."""
    root = Root(url)
    m = layout.read_manifest(root)
    markers, problems = layout.load_markers(root, m)
    missing = sorted(set(range(m.n_shards)) - set(markers))
    referenced = {mk.data for mk in markers.values()}
    # an int8 store adds a float32 scale per layer and group of values to each token's L x d values
    scales = 4 * layout.quant_groups(m.d_model) if m.dtype == "int8" else 0
    bytes_per_token = m.n_layers * (m.d_model * layout.STORED_DTYPE[m.dtype].itemsize + scales)
    return {
        "url": url,
        "format_version": m.format_version,
        "fingerprint": m.fingerprint,
        "content_digest": content_digest(m.fingerprint, markers),
        "fingerprint_fields": m.fingerprint_fields,
        "queries": m.n_queries,
        "views": m.views,
        "shard_size": m.shard_size,
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "dtype": m.dtype,
        "bytes_per_value": bytes_per_token / (m.n_layers * m.d_model),
        "bytes_per_token": bytes_per_token,
        "shards_total": m.n_shards,
        "shards_published": len(markers),
        "missing_shards": missing,
        "complete": not missing,
        "items_stored": sum(len(layout.kept_queries(m, s, mk.skipped)) * m.views for s, mk in markers.items()),
        "tokens_stored": sum(mk.tokens for mk in markers.values()),
        "skipped": {q: reason for s in sorted(markers) for q, reason in markers[s].skipped.items()},
        "bytes_on_disk": root.size(),
        # Data directories of interrupted writes: harmless, removed when their shard is published.
        "unpublished_dirs": [d for d in layout.data_dirs(root) if d not in referenced],
        "marker_problems": problems,
        "created_at": m.created_at,
        "created_by": m.created_by,
    }


def verify(url: str) -> list[str]:
    """Problems of the store, one line each (empty list: every shard published, readable and
    consistent with the manifest, and every array matches its checksum)."""
    root = Root(url)
    try:
        m = layout.read_manifest(root)
    except StoreError as e:
        return [str(e)]
    markers, problems = layout.load_markers(root, m)
    for shard in sorted(markers):
        marker = markers[shard]
        try:
            arrays = layout.read_arrays(root, marker)
        except StoreError as e:
            problems.append(str(e))
            continue
        problems += layout.check_arrays(m, marker, arrays, checksums=True)
    missing = sorted(set(range(m.n_shards)) - set(markers))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        problems.append(f"{len(missing)} of {m.n_shards} shards are not published ({shown}); "
                        "rerun the teacher with the same configuration to fill them")
    return problems


def content_digest(fingerprint: str, markers: dict[int, layout.Marker]) -> str:
    """sha256 over the manifest fingerprint and each published shard's CRC-32s and skipped ids:
    two stores with equal digests (and no verify problems) hold identical targets."""
    shards = {str(s): {"crc32": mk.crc32, "skipped": mk.skipped} for s, mk in markers.items()}
    return hashlib.sha256(canonical_json({"fingerprint": fingerprint, "shards": shards})).hexdigest()
