"""What one source record becomes in a shard: checked, decoded when it must be, re-encoded.

The single-process build (build.py) and the Ray Data build (on_ray.py) both call `convert_record`
and `check_label`, so a record becomes the same bytes, or is skipped for the same reason, whichever
builds it. Shards are written by `write_shard`, also shared, with the same row groups and codec.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from lejepa_platform.data.decode import BadImage, array_to_image, encode, load_image, open_image
from lejepa_platform.data.sources import RawRecord
from lejepa_platform.errors import UserError

ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: the smallest unit a reader fetches."""
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("id", pa.string())])


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How records are stored: image_format keep / png / jpeg, max_side (0: never downscale), and the
    pixel limit above which a record is skipped as too large."""

    image_format: str
    max_side: int
    max_pixels: int


def convert_record(record: RawRecord, opts: Conversion) -> bytes | str:
    """Encoded bytes for the shard, or the skip reason (one of decode.REASONS)."""
    try:
        if isinstance(record.payload, np.ndarray):
            image = array_to_image(record.payload)
            image = _shrink(image, opts.max_side) or image
            return encode(image, "jpeg" if opts.image_format == "jpeg" else "png")
        if opts.image_format == "keep":
            header = open_image(record.payload, opts.max_pixels)
            if opts.max_side <= 0 or max(header.size) <= opts.max_side:
                return bytes(record.payload)
            original = "jpeg" if header.format == "JPEG" else "png"
            return encode(_shrink(load_image(record.payload, opts.max_pixels), opts.max_side), original)
        image = load_image(record.payload, opts.max_pixels)
        return encode(_shrink(image, opts.max_side) or image, opts.image_format)
    except BadImage as err:
        return err.reason
    except ValueError:
        return "undecodable"


def check_label(record: RawRecord, names: Sequence[str]) -> None:
    """UserError unless the record's label is -1 (unlabelled) or names one of the classes."""
    if record.label < -1 or (names and record.label >= len(names)):
        raise UserError(f"record {record.id!r} has label {record.label}; allowed: -1 (unlabelled) or "
                        f"0..{len(names) - 1} for the {len(names)} class names" if names else
                        f"record {record.id!r} has label {record.label}; allowed: -1 or >= 0")


def _shrink(image: Image.Image, max_side: int) -> Image.Image | None:
    width, height = image.size
    if max_side <= 0 or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


def shard_table(images: Sequence[bytes], labels: Sequence[int], ids: Sequence[str]) -> pa.Table:
    """A shard's rows in the shard schema."""
    return pa.Table.from_arrays([pa.array(images, pa.binary()), pa.array(labels, pa.int64()),
                                 pa.array(ids, pa.string())], schema=SCHEMA)


def write_shard(table: pa.Table, path: str, filesystem: pafs.FileSystem) -> None:
    """One shard file (zstd, ROW_GROUP_ROWS rows per row group)."""
    pq.write_table(table, path, filesystem=filesystem, row_group_size=ROW_GROUP_ROWS, compression="zstd")


def digest_table(table: pa.Table) -> str:
    """A shard's content digest: ids, labels and image hashes in row order."""
    digest = hashlib.sha256()
    for image, label, record_id in zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                                       table.column("id").to_pylist()):
        digest.update(f"{record_id}\t{label}\t".encode() + hashlib.sha256(image).digest())
    return digest.hexdigest()
