"""The target store: a manifest plus published Zarr v3 shards of per-layer hidden states.

Modules: `manifest` (Manifest, fingerprint, shard arithmetic), `writer` (open_for_write, Item),
`reader` (TargetReader, read_items, open_manifest), `inspection` (info, verify), `errors`.
`layout` holds the names and array formats of PROTOCOL.md, the normative description of the format.
Import from the submodules; this package imports nothing, so `storage.inspection` stays torch-free.
"""
