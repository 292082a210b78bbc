"""Safe defaults: secrets are masked before params are logged, and nothing the project starts
listens on every interface."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from lejepa_platform.config import RunConfig, flatten
from lejepa_platform.redact import MASK, is_secret_key, redact_params, redact_uri

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

SECRET_KEYS = ["api_key", "track.hf_token", "AWS_SECRET_ACCESS_KEY", "apiKey", "APIKey", "apikey",
               "db_pass", "password", "s3.credentials", "Authorization", "private_key", "x.auth"]
PLAIN_KEYS = ["model.proj_dim", "train.keep_checkpoints", "tokenizer", "num_tokens", "keyframes",
              "passes", "monkey", "bypass", "track.uri", "data.source", "secrets_dir.lr"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_ordinary_keys_are_not_secret(key):
    assert not is_secret_key(key)


def test_no_field_of_the_run_config_is_mistaken_for_a_secret():
    params = flatten(RunConfig())
    assert redact_params(params) == params
    assert not [key for key in params if is_secret_key(key)]


def test_redact_uri_masks_passwords_and_secret_query_values_only():
    assert redact_uri("postgresql://bob:s3cr:et@db.internal:5432/mlflow") == f"postgresql://bob:{MASK}@db.internal:5432/mlflow"
    presigned = "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AKIA%2F1&X-Amz-Date=20240101&X-Amz-Signature=abc123"
    assert redact_uri(presigned) == f"https://b.s3.amazonaws.com/x.tar?X-Amz-Credential={MASK}&X-Amz-Date=20240101&X-Amz-Signature={MASK}"
    for unchanged in ("http://10.0.0.5:5000", "http://10.0.0.5:5000/ajax-api@v2", "s3://bucket/runs?versionId=7",
                      "sqlite:///home/me/mlflow.db", "plain text with key=value"):
        assert redact_uri(unchanged) == unchanged


def test_redact_params_masks_keys_and_uris_at_any_depth_without_mutating():
    params = {
        "track.uri": "https://user:hunter2@mlflow.example.com",
        "track.api_key": "sk-live-123",
        "train.storage_path": "s3://bucket/runs",
        "model.proj_dim": 64,
        "train.keep_checkpoints": 2,
        "model.backbone_kwargs": {"hf_token": "hf_abc", "embed_dim": 96},
        "data.sources": ["ftp://me:pw@files.example.com/a.tar", 3],
        "env.session_token": 123456,
        "env.auth_enabled": True,
        "env.password": None,
        "env.secret": "",
    }
    before = copy.deepcopy(params)
    assert redact_params(params) == {
        "track.uri": f"https://user:{MASK}@mlflow.example.com",
        "track.api_key": MASK,
        "train.storage_path": "s3://bucket/runs",
        "model.proj_dim": 64,
        "train.keep_checkpoints": 2,
        "model.backbone_kwargs": {"hf_token": MASK, "embed_dim": 96},
        "data.sources": [f"ftp://me:{MASK}@files.example.com/a.tar", 3],
        "env.session_token": MASK,
        "env.auth_enabled": True,
        "env.password": None,
        "env.secret": "",
    }
    assert params == before


# --------------------------------------------------------------------------------------------
# Bind addresses. Code and the cluster config may not name 0.0.0.0 (or ::) as a host; the only
# files allowed to mention it are those that detect it.

DETECTORS = {"platform/lejepa_platform/cluster.py"}
ANY_HOST = re.compile(r"0\.0\.0\.0|(?:host\s*=\s*|--host[= ]|--dashboard-host[= ])[\"']?(?:::|\[::\])(?![\w:])")
HOST_VALUE = re.compile(r"(?:dashboard_host|\bhost)\s*=\s*[\"']([^\"']+)[\"']|--(?:dashboard-)?host[= ]+\"?([^\s\"]+)")


def scanned_files() -> list[Path]:
    files = [ROOT / "cluster.yaml", *sorted((ROOT / "platform").rglob("*.py"))]
    for folder in ("pipelines", "sweeps"):
        files += sorted((ROOT / folder).glob("*.py"))
    return files


def test_no_source_file_binds_every_interface():
    offenders = [str(f.relative_to(ROOT)) for f in scanned_files()
                 if str(f.relative_to(ROOT)) not in DETECTORS and ANY_HOST.search(f.read_text())]
    assert offenders == []
    for detector in DETECTORS:  # the allow-list stays honest: each entry really detects it
        assert "0.0.0.0" in (ROOT / detector).read_text()


def test_every_explicit_host_in_the_sources_is_loopback_or_the_head_address():
    allowed = {"127.0.0.1", "localhost", "$HEAD_IP"}
    found = {(str(f.relative_to(ROOT)), a or b) for f in scanned_files() if str(f.relative_to(ROOT)) not in DETECTORS
             for a, b in HOST_VALUE.findall(f.read_text())}
    assert {host for _, host in found} <= allowed, found
    assert ("cluster.yaml", "127.0.0.1") in found and ("cluster.yaml", "$HEAD_IP") in found


def test_cluster_yaml_binds_the_dashboard_to_loopback_and_mlflow_to_the_private_address():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert re.search(r"mlflow server --host \"\$HEAD_IP\"", start)
    assert "HEAD_IP=$(ip -o route get 1" in start  # the private address, found by routing
