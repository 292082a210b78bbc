"""Shared fixtures: one local Ray cluster per test session, and small real images.

The images come from the embedded Fashion-MNIST shard (real photographs of clothing, 28 x 28 grey),
so decode and augmentation tests run on real content without any download.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tarfile
import zlib
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image


def start_session_ray() -> None:
    """The session's local Ray cluster: 2 CPUs, and the custom resource sweep trials hold (sweep/tune.py)."""
    from lejepa_platform.ray_env import init_ray

    init_ray(num_cpus=2, resources={"trial_driver": 2}, object_store_memory=500 * 1024**2, include_dashboard=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster shared by every e2e test of the session (start-up costs seconds)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    start_session_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def cloud(ray_cluster, tmp_path_factory) -> SimpleNamespace:
    """A bucket behind a real S3 API, and MLflow servers that keep their artifacts in buckets.

    moto's S3 server on loopback holds the bucket `lejepa`; `server` is a real `mlflow server`
    (SQLite store) proxying artifacts to s3://lejepa/mlflow as cluster.yaml runs it, and `broken` one
    whose artifact bucket does not exist (it may still be starting: `broken.wait_healthy()`). The S3
    variables (`env`: endpoint, dummy credentials) are
    set in this process for the rest of the session, together with the defaults every `lejepa`
    process sets, and the session's Ray cluster is started again so that its workers have them too.
    `moto` is the S3 server (`moto.frozen()`: an outage), `s3` a boto3 client for it.
    """
    import ray

    from clusters import NO_EGRESS, mlflow_server, moto_server, s3_env
    from lejepa_platform.cli import PROCESS_DEFAULTS

    root = tmp_path_factory.mktemp("cloud")
    with contextlib.ExitStack() as stack:
        moto = stack.enter_context(moto_server(root / "moto"))
        env = s3_env(moto.endpoint, root)
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")  # never a real cloud endpoint
        s3 = moto.client()
        s3.create_bucket(Bucket="lejepa")
        server_env = {**env, **NO_EGRESS}
        broken = stack.enter_context(mlflow_server(root / "broken", wait=False, artifacts="s3://no-such-bucket/mlflow",
                                                   env=server_env))
        server = stack.enter_context(mlflow_server(root / "mlflow", artifacts="s3://lejepa/mlflow", env=server_env))
        variables = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in {**PROCESS_DEFAULTS, **env}.items():
            variables.setenv(key, value)
        ray.shutdown()
        start_session_ray()
        yield SimpleNamespace(moto=moto, s3=s3, env=env, server=server, broken=broken, root=root)


@pytest.fixture(scope="session")
def fmnist_sample() -> dict:
    """The first 60 records of the embedded dataset: PNG bytes, (60, 28, 28) pixels, labels, ids."""
    from lejepa_platform.data.shards import resolve_source

    shard = resolve_source("builtin:fashion-mnist-10k") / "part-00000.parquet"
    table = pq.ParquetFile(shard).read_row_group(0).slice(0, 60)
    pngs = table.column("image").to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs])
    return {"png": pngs, "pixels": pixels, "labels": table.column("label").to_numpy(),
            "ids": table.column("id").to_pylist()}


def colour_image(grey: np.ndarray, tint: tuple[float, float, float], size: tuple[int, int]) -> np.ndarray:
    """A real grey image tinted into RGB and resized to (width, height): colour content for the views."""
    rgb = np.clip(grey[:, :, None].astype(np.float64) * np.array(tint)[None, None, :] + 20, 0, 255).astype(np.uint8)
    return np.array(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kwargs)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def image_tools() -> SimpleNamespace:
    """encode(array, fmt, **kw) -> bytes; colour(grey, tint, (w, h)) -> RGB array;
    bomb(w, h) -> PNG bytes claiming that size; write_tar(path, [(name, bytes), ...])."""
    return SimpleNamespace(encode=encode, colour=colour_image, bomb=png_claiming, write_tar=write_tar)


def write_tar(path, samples) -> None:
    """A tar archive of (member name, bytes) pairs, as WebDataset shards are."""
    with tarfile.open(path, "w") as archive:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Views run single-threaded, as in a data worker (also one fixed order of reductions)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def class_folder(tmp_path, fmnist_sample):
    """A class-per-subfolder image folder: 3 classes, 12 images (grey PNGs and RGB JPEGs), plus a
    non-image file that must be ignored."""
    root = tmp_path / "folder"
    tints = [(1.0, 0.6, 0.3), (0.3, 0.9, 1.0), (0.8, 0.8, 0.2)]
    for index in range(12):
        cls = ["boots", "coats", "shirts"][index % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        grey = fmnist_sample["pixels"][index]
        if index % 2:
            data = encode(colour_image(grey, tints[index % 3], (40, 30)), "JPEG", quality=92)
            (root / cls / f"img{index:02d}.jpg").write_bytes(data)
        else:
            (root / cls / f"img{index:02d}.png").write_bytes(encode(grey, "PNG"))
    (root / "coats" / "notes.txt").write_text("not an image")
    return root
