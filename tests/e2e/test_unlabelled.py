"""Your own unlabelled images, start to finish, as a user runs it (`lejepa` in-process on the test
session's Ray cluster, a real SQLite MLflow store): a flat folder -> shards -> a tiny pretraining
that ends FINISHED with the label-free report; a labelled probe set (eval.data) adds linear and
kNN; an evaluation that fails after training marks the run FAILED, keeps the backbone and names
the checkpoint; a bad eval.data fails in one line before any worker starts."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from lejepa_platform.cli import main
from lejepa_platform.config import RunConfig, to_dict
from lejepa_platform.data.sources import resolve_source
from lejepa_platform.tracking import find_run
from lejepa_platform.run.storage import RECORD

pytestmark = pytest.mark.e2e

LABEL_FREE = ("sigreg", "effective_rank", "effective_rank_fraction")
PICTURES = {"backbone.safetensors", "loss_curve.png", "spectrum.png", "patch_pca.png", "evaluation.json"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """300 unlabelled PNGs in a flat folder, and 120 labelled ones in class folders (no manifest)."""
    root = tmp_path_factory.mktemp("own")
    table = pq.read_table(resolve_source("builtin:fashion-mnist-10k") / "part-00000.parquet").slice(0, 420)
    pngs, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    flat, probe = root / "flat", root / "probe"
    flat.mkdir()
    for i in range(300):
        (flat / f"{i:04d}.png").write_bytes(pngs[i])
    for i in range(300, 420):
        (probe / f"class{labels[i]}").mkdir(parents=True, exist_ok=True)
        (probe / f"class{labels[i]}" / f"{i:04d}.png").write_bytes(pngs[i])
    assert main(["shards", "build", str(flat), str(root / "shards")]) == 0  # the CLI's default 10 % held out
    return root


def recipe(tmp_path: Path, cfg: RunConfig) -> str:
    """A recipe file returning `cfg`, so the run goes through `lejepa pretrain RECIPE` like a user's."""
    path = tmp_path / "recipe.py"
    text = json.dumps(json.dumps(to_dict(cfg)))
    path.write_text("import json\nfrom lejepa_platform.config import RunConfig\nfrom lejepa_platform.overrides import from_dict\n\n\n"
                    f"def config():\n    return from_dict(RunConfig, json.loads({text}))\n")
    return str(path)


def config(tmp_path: Path, images: Path, name: str, *extra: str) -> RunConfig:
    from test_pretrain import tiny_config

    return tiny_config(tmp_path, f"train.name={name}", "train.steps=10", "train.workers=1", "train.log_every=5",
                       "data.local_views=0", f"data.source={images / 'shards'}", "eval.enabled=true", *extra)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unlabelled_folder_pretrains_to_finished_with_the_label_free_report(ray_cluster, images, tmp_path, capsys):
    cfg = config(tmp_path, images, "unlabelled")
    code, out, err = run_cli(capsys, "pretrain", recipe(tmp_path, cfg), "--json")
    assert code == 0, err
    summary = json.loads(out)
    report = summary["evaluation"]
    assert report["skipped"].startswith("labelled protocols (linear, knn) skipped") and "no labels" in report["skipped"]
    assert report["models"] == {"pretrained": None, "random_init": None, "raw_pixels": None}
    assert report["num_held_out"] == 30 and report["split"] == "own"  # the build's 10 % of 300
    run = find_run(cfg.track.uri, summary["mlflow_run_id"])
    assert run["status"] == "FINISHED"
    for model in ("pretrained", "random_init"):
        for key in LABEL_FREE:
            assert f"eval/geometry/{model}/{key}" in run["metrics"], (model, key)
        assert 1.0 <= run["metrics"][f"eval/geometry/{model}/effective_rank"] <= 32
    assert not any(key.startswith("eval/pretrained/") for key in run["metrics"])
    assert PICTURES <= {f.path for f in MlflowClient(cfg.track.uri).list_artifacts(run["run_id"])}


def test_a_labelled_eval_data_adds_linear_and_knn(ray_cluster, images, tmp_path, capsys):
    cfg = config(tmp_path, images, "probed", f"eval.data={images / 'probe'}")
    code, out, err = run_cli(capsys, "pretrain", recipe(tmp_path, cfg), "--json")
    assert code == 0, err
    summary = json.loads(out)
    report = summary["evaluation"]
    assert report["skipped"] is None and report["split"] == "seeded"  # a plain folder: a seeded split
    assert report["num_train"] + report["num_test"] == 120 and report["num_held_out"] == report["num_test"]
    run = find_run(cfg.track.uri, summary["mlflow_run_id"])
    assert run["status"] == "FINISHED"
    for key in ("eval/pretrained/linear", "eval/pretrained/knn_k20", "eval/random_init/linear",
                "eval/geometry/pretrained/sigreg"):
        assert key in run["metrics"], key
    assert 0.0 <= run["metrics"]["eval/pretrained/linear"] <= 1.0
    assert run["metrics"]["eval/pretrained/knn_k20"] == pytest.approx(report["models"]["pretrained"]["knn_k20"])
    assert PICTURES <= {f.path for f in MlflowClient(cfg.track.uri).list_artifacts(run["run_id"])}


def delete_when_the_run_starts(run_dir: Path, doomed: Path) -> threading.Thread:
    """Delete `doomed` once the run's record is written: after preflight, before training ends."""
    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (run_dir / RECORD).is_file():
            time.sleep(0.05)
        shutil.rmtree(doomed)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_evaluation_failing_after_training_marks_the_run_failed_and_names_the_checkpoint(
        ray_cluster, images, tmp_path, capsys):
    doomed = tmp_path / "probe"
    shutil.copytree(images / "probe", doomed)
    cfg = config(tmp_path, images, "doomed", f"eval.data={doomed}")
    watcher = delete_when_the_run_starts(tmp_path / "runs" / "doomed", doomed)
    code, out, err = run_cli(capsys, "pretrain", recipe(tmp_path, cfg), "--json")
    watcher.join(timeout=5)
    assert not doomed.exists()
    assert code == 1 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("lejepa: run failed: doomed: training finished but the end of the run failed")
    assert "does not exist" in line
    checkpoints = sorted(p for p in (tmp_path / "runs" / "doomed").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and f"lejepa eval {checkpoints[-1]} --data {doomed}" in line
    from lejepa_platform.run.storage import read_run_record

    run_id = read_run_record(cfg.train.storage_path, "doomed")["mlflow_run_id"]
    run = find_run(cfg.track.uri, run_id)
    assert run["status"] == "FAILED"
    assert "backbone.safetensors" in {f.path for f in MlflowClient(cfg.track.uri).list_artifacts(run_id)}


@pytest.mark.parametrize("eval_data, message", [
    ("MISSING", "eval.data: source"),
    ("UNLABELLED", "has no labels (all 300 images are label -1), but eval.protocols = linear,knn need labelled"),
])
def test_bad_eval_data_is_one_line_exit_2_before_any_worker(ray_cluster, images, tmp_path, capsys, eval_data, message):
    data = {"MISSING": str(tmp_path / "nowhere"), "UNLABELLED": str(images / "shards")}[eval_data]
    cfg = config(tmp_path, images, "bad", f"eval.data={data}")
    started = time.monotonic()
    code, out, err = run_cli(capsys, "pretrain", recipe(tmp_path, cfg))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert time.monotonic() - started < 10
    assert not (tmp_path / "runs" / "bad").exists()
