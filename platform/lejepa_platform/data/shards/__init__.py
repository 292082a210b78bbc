"""Write, read and inspect Parquet image shards: columns image (encoded bytes), label (int64, -1 when
unlabelled), id (string, stable across rebuilds), plus a manifest.json.

`build` writes them (atomic, resumable, to a directory or object storage), `inspect` reads them back
and checks every image, `split` holds the fixed train/test split the manifest records.
"""

from lejepa_platform.data.shards.build import build_shards
from lejepa_platform.data.shards.inspect import inspect_shards
from lejepa_platform.data.shards.split import split_mask
from lejepa_platform.data.sources import read_manifest, resolve_source

__all__ = ["build_shards", "inspect_shards", "read_manifest", "resolve_source", "split_mask"]
