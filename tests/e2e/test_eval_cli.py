"""`lejepa eval` as a user runs it: a real pretrained checkpoint, the CLI in a subprocess, the
report on stdout, results attached to the MLflow run, one clear line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lejepa_platform.tracking import find_run
from lejepa_platform.run.launch import pretrain

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def lejepa(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lejepa_platform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """One tiny pretraining whose checkpoint and MLflow run the tests evaluate."""
    from test_pretrain import tiny_config

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, "train.name=evalme", "train.steps=10", "train.workers=1", "train.log_every=5",
                      "data.local_views=0")
    summary = pretrain(cfg, quiet=True)
    return cfg, summary, tmp / "runs" / "evalme", tmp  # a run directory: eval takes its latest checkpoint


def test_eval_checkpoint_reports_pretrained_random_init_and_raw_pixels(trained):
    cfg, _, checkpoint, tmp = trained
    out = lejepa("eval", str(checkpoint), "--data", "builtin:fashion-mnist-10k", "--protocol", "knn",
                 "--features", "embedding", "--json", cwd=tmp)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["num_train"] == 8000 and report["num_test"] == 2000 and report["num_classes"] == 10
    assert (report["features"], report["feature_dim"]) == ("embedding", report["embed_dim"])
    for model in ("pretrained", "random_init", "raw_pixels"):
        assert 0.1 < report["models"][model]["knn_k20"] <= 1.0
    lift = report["lift"]["vs_random_init"]["knn_k20"]
    assert lift == pytest.approx(report["models"]["pretrained"]["knn_k20"] - report["models"]["random_init"]["knn_k20"])
    assert Path(tmp / "lejepa-eval").is_dir() and Path(report["plots"]["spectrum"]).stat().st_size > 1000


def test_eval_run_id_attaches_metrics_and_plots_to_the_run(trained):
    cfg, summary, _, tmp = trained
    run_id = summary["mlflow_run_id"]
    out = lejepa("eval", run_id, "--data", "builtin:fashion-mnist-10k", "--protocol", "knn",
                 "--tracking-uri", cfg.track.uri, "--json", cwd=tmp)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["features"] == "embedding+patch_mean"  # the run's eval.features
    run = find_run(cfg.track.uri, run_id)
    assert run["status"] == "FINISHED"  # attaching results does not reopen the run
    assert run["metrics"]["eval/pretrained/knn_k20"] == pytest.approx(json.loads(out.stdout)["models"]["pretrained"]["knn_k20"])
    eval_artifacts = {f.path for f in MlflowClient(cfg.track.uri).list_artifacts(run_id, "eval")}
    assert {"eval/evaluation.json", "eval/spectrum.png"} <= eval_artifacts


@pytest.fixture(scope="module")
def unusable_data(trained, fmnist_sample):
    """Unlabelled shards (a flat folder) with a train/test split."""
    _, _, _, tmp = trained
    built = {"UNLABELLED": tmp / "unlabelled"}
    flat = tmp / "flat"
    flat.mkdir()
    for i, png in enumerate(fmnist_sample["png"][:40]):
        (flat / f"{i:03d}.png").write_bytes(png)
    assert lejepa("shards", "build", str(flat), str(built["UNLABELLED"]), "--test-fraction", "0.5",
                  cwd=tmp).returncode == 0
    return built


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/checkpoint", "--data", "builtin:fashion-mnist-10k"], "not a checkpoint directory"),
    (["0123456789abcdef", "--data", "builtin:fashion-mnist-10k"], "no MLflow run with id"),
    (["CKPT", "--data", "builtin:fashion-mnist-10k", "--protocol", "knn,bogus"], "--protocol"),
    (["CKPT", "--data", "/nonexistent/probe-set"], "does not exist"),
    (["CKPT", "--data", "UNLABELLED", "--protocol", "knn"], "has no labels"),
])
def test_eval_bad_input_is_one_line_and_exit_2(trained, unusable_data, args, message):
    cfg, _, checkpoint, tmp = trained
    args = [str(checkpoint) if a == "CKPT" else str(unusable_data.get(a, a)) for a in args]
    out = lejepa("eval", *args, "--tracking-uri", cfg.track.uri, cwd=tmp)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr


def test_eval_on_unlabelled_data_gives_the_label_free_report(trained, unusable_data):
    """No --protocol: the default probes are skipped with the reason, the geometry is reported."""
    cfg, _, checkpoint, tmp = trained
    out = lejepa("eval", str(checkpoint), "--data", str(unusable_data["UNLABELLED"]), "--json", cwd=tmp)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["skipped"].startswith("labelled protocols (knn, linear) skipped") and "no labels" in report["skipped"]
    assert report["num_held_out"] == 20 and report["split"] == "own"  # --test-fraction 0.5 of 40
    assert report["models"] == {"pretrained": None, "random_init": None, "raw_pixels": None}
    pretrained, random_init = report["geometry"]["pretrained"], report["geometry"]["random_init"]
    assert pretrained != random_init and 1.0 <= pretrained["effective_rank"] <= report["embed_dim"]
    assert Path(report["plots"]["spectrum"]).stat().st_size > 1000 and report["plots"]["patch_pca"]
