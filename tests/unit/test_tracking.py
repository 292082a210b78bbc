"""Tracking: what the trackers record, read back from a real SQLite MLflow store (one per module:
creating the schema takes seconds)."""

import importlib.metadata
import json
import os
import pathlib
import subprocess

import pytest

from lejepa_platform import tracking
from lejepa_platform.errors import UserError
from lejepa_platform.redact import redact_params
from lejepa_platform.tracking import InMemoryTracker, MLflowTracker, NullTracker

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")]

SECRET = "hunter2"
PARAMS = {"loss.lam": 0.05, "data.global_scale": (0.3, 1.0), "model.backbone_kwargs": {"patch_size": 8},
          "train.use_gpu": False, "track.uri": f"https://alice:{SECRET}@mlflow.example.com/",
          "cloud.api_key": SECRET, "notes": "x" * 700}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        root = tmp_path_factory.mktemp("mlflow")
        yield f"sqlite:///{root / 'mlflow.db'}", root


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


# --- URI ------------------------------------------------------------------------------------


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("http://head:5000") == "http://head:5000"
    # Relative SQLite paths are pinned to this directory (Ray workers run elsewhere).
    assert tracking.resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"  # nothing set globally


# --- store-less trackers ---------------------------------------------------------------------


def test_prepare_params_redacts_stringifies_and_caps():
    prepared = tracking.prepare_params(PARAMS)
    assert prepared["loss.lam"] == "0.05" and prepared["train.use_gpu"] == "False"
    assert json.loads(prepared["data.global_scale"]) == [0.3, 1.0]
    assert json.loads(prepared["model.backbone_kwargs"]) == {"patch_size": 8}
    assert len(prepared["notes"]) == tracking.PARAM_VALUE_LIMIT and prepared["notes"].endswith("...")
    assert not any(SECRET in v for v in prepared.values())
    redacted = redact_params(PARAMS)
    assert prepared["track.uri"] == redacted["track.uri"] != PARAMS["track.uri"]
    assert prepared["cloud.api_key"] == redacted["cloud.api_key"]


def test_null_tracker_records_nothing_and_checks_status(tmp_path):
    null = NullTracker()
    assert null.run_id is None
    null.log_params(PARAMS)
    null.log_metrics({"loss/total": 1.0}, step=3)
    null.set_tags({"a": "b"})
    null.log_artifact(str(tmp_path / "missing"))  # no-op even for a missing file: ranks > 0 never write
    null.log_dict({"a": 1}, "x.json")
    null.finish("KILLED")
    assert vars(null) == {} and null.history("loss/total") == []
    with pytest.raises(UserError, match="DONE.*FINISHED, FAILED, KILLED"):
        null.finish("DONE")


def test_in_memory_tracker_records_what_a_store_would_receive(tmp_path):
    mem = InMemoryTracker()
    mem.log_params(PARAMS)
    mem.log_metrics({"loss/total": 2.0, "loss/sigreg": 0.5}, step=1)
    mem.log_metrics({"loss/total": 1.5}, step=2)
    mem.log_metrics({"loss/total": 1.7}, step=1)  # step 1 replayed after a resume
    mem.set_tags({"stage": "pretrain", "long": "y" * 9000})
    artifact = tmp_path / "a.txt"
    artifact.write_text("hi")
    mem.log_artifact(str(artifact), "files")
    mem.log_dict({"t": (1, 2)}, "config.json")
    mem.finish()
    assert mem.params == tracking.prepare_params(PARAMS)
    assert mem.metrics == {"loss/total": [(1, 2.0), (2, 1.5), (1, 1.7)], "loss/sigreg": [(1, 0.5)]}
    assert mem.history("loss/total") == [(1, 1.7), (2, 1.5)] and mem.history("absent") == []
    assert len(mem.tags.pop("long")) == tracking.TAG_VALUE_LIMIT
    assert mem.tags == {"stage": "pretrain"} and mem.artifacts == [(str(artifact), "files")]
    assert mem.dicts == {"config.json": {"t": [1, 2]}} and mem.status == "FINISHED"
    with pytest.raises(UserError, match="does not exist"):
        mem.log_artifact(str(tmp_path / "missing"))


# --- MLflow ---------------------------------------------------------------------------------


def test_mlflow_run_records_params_metrics_tags_and_artifacts(store, tmp_path):
    uri, root = store
    run = MLflowTracker.start(uri, "unit", run_name="first", tags={"stage": "pretrain"})
    many = {f"p{i:03d}": i for i in range(150)}  # more than one log_batch of params
    run.log_params({**PARAMS, **many})
    for step in (2, 0, 1):
        run.log_metrics({"loss/total": 1.0 / (step + 1), "loss/sigreg": float(step)}, step=step)
    run.set_tags({"phase": "warmup"})
    artifact = tmp_path / "notes.txt"
    artifact.write_text("checkpoint notes")
    run.log_artifact(str(artifact), "files")
    run.log_dict({"model": {"backbone": "vit_tiny"}}, "config/resolved.json")
    run.finish()

    found = tracking.find_run(uri, run.run_id)
    assert found["name"] == "first" and found["status"] == "FINISHED" and found["end_time"] >= found["start_time"]
    assert found["params"] == tracking.prepare_params({**PARAMS, **many})
    assert not any(SECRET in v for v in found["params"].values())
    assert found["metrics"] == {"loss/total": pytest.approx(1.0 / 3), "loss/sigreg": 2.0}  # latest = highest step
    assert found["tags"]["stage"] == "pretrain" and found["tags"]["phase"] == "warmup"
    assert tracking.metric_history(uri, run.run_id, "loss/total") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    # Artifacts live next to the database, whatever the creating process's working directory.
    assert pathlib.Path(found["artifact_uri"].removeprefix("file://")).is_relative_to(root / "mlruns")
    got = tracking.download_artifact(uri, run.run_id, "files/notes.txt", str(tmp_path / "dl"))
    assert pathlib.Path(got).read_text() == "checkpoint notes"
    got = tracking.download_artifact(uri, run.run_id, "config/resolved.json", str(tmp_path / "dl"))
    assert json.loads(pathlib.Path(got).read_text()) == {"model": {"backbone": "vit_tiny"}}
    with pytest.raises(UserError, match="no artifact 'nope.txt'.*config, files"):
        tracking.download_artifact(uri, run.run_id, "nope.txt", str(tmp_path / "dl"))


def test_resume_keeps_run_id_appends_metrics_and_keeps_changed_params_as_tags(store, capsys):
    uri, _ = store
    first = MLflowTracker.start(uri, "unit", run_name="resumable")
    first.log_params({"train.steps": 100, "loss.lam": 0.05})
    for step in range(3):
        first.log_metrics({"loss/total": 10.0 - step}, step=step)
    first.finish("FAILED")

    again = MLflowTracker.start(uri, "unit", run_id=first.run_id)
    assert again.run_id == first.run_id and again.experiment_id == first.experiment_id
    assert tracking.find_run(uri, first.run_id)["status"] == "RUNNING"
    again.log_params({"train.steps": 200, "loss.lam": 0.05})  # steps extended on resume
    assert "train.steps" in capsys.readouterr().err
    for step in range(2, 5):  # resumed from the checkpoint at step 2: step 2 is replayed
        again.log_metrics({"loss/total": 5.0 - step}, step=step)
    again.finish()

    found = tracking.find_run(uri, first.run_id)
    assert found["status"] == "FINISHED" and found["params"] == {"train.steps": "100", "loss.lam": "0.05"}
    assert found["tags"]["resumed.train.steps"] == "200" and "resumed.loss.lam" not in found["tags"]
    assert tracking.metric_history(uri, first.run_id, "loss/total") == [(0, 10.0), (1, 9.0), (2, 3.0), (3, 2.0),
                                                                       (4, 1.0)]
    assert again.history("loss/total") == tracking.metric_history(uri, first.run_id, "loss/total")
    assert again.tracking_uri == uri
    with pytest.raises(UserError, match="no MLflow run with id 'deadbeef'"):
        MLflowTracker.start(uri, "unit", run_id="deadbeef")


def test_child_runs_carry_the_parent_tag_and_are_searchable(store):
    uri, _ = store
    parent = MLflowTracker.start(uri, "sweep-x", run_name="sweep", tags={tracking.SWEEP_TAG: "parent"})
    kids = []
    for i in range(3):
        child = MLflowTracker.start(uri, "sweep-x", run_name=f"trial_{i}", parent_run_id=parent.run_id)
        child.log_params({"loss.lam": 0.01 * (i + 1)})
        child.log_metrics({"loss/total": float(i)}, step=10)
        child.finish()
        kids.append(child.run_id)
    parent.finish()
    runs = tracking.search_runs(uri, "sweep-x")
    assert {r["run_id"] for r in runs} == {parent.run_id, *kids}
    children = tracking.search_runs(uri, "sweep-x", parent_run_id=parent.run_id)
    assert [r["run_id"] for r in children] == kids  # oldest first
    assert all(r["tags"][tracking.PARENT_TAG] == parent.run_id for r in children)
    assert [r["metrics"]["loss/total"] for r in children] == [0.0, 1.0, 2.0]
    assert [r["params"]["loss.lam"] for r in children] == ["0.01", "0.02", "0.03"]
    assert set(children[0]) == {"run_id", "name", "status", "experiment_id", "params", "metrics", "tags",
                                "start_time", "end_time", "artifact_uri"}
    with pytest.raises(UserError, match="no MLflow run"):
        MLflowTracker.start(uri, "sweep-x", parent_run_id="0" * 32)


def test_attaching_artifacts_leaves_the_run_status_alone(store, tmp_path):
    uri, _ = store
    running = MLflowTracker.start(uri, "unit", run_name="attach")
    report = tmp_path / "report.md"
    report.write_text("# report")
    tracking.log_artifacts_to_run(uri, running.run_id, [str(report)], artifact_path="analysis")
    assert tracking.find_run(uri, running.run_id)["status"] == "RUNNING"
    running.finish()
    before = tracking.find_run(uri, running.run_id)
    tracking.log_artifacts_to_run(uri, running.run_id, [str(report)], artifact_path="again")
    after = tracking.find_run(uri, running.run_id)
    assert (after["status"], after["end_time"]) == ("FINISHED", before["end_time"])
    got = tracking.download_artifact(uri, running.run_id, "again/report.md", str(tmp_path / "dl"))
    assert pathlib.Path(got).read_text() == "# report"


def test_finish_records_the_status_and_refuses_unknown_ones(store):
    uri, _ = store
    failed = MLflowTracker.start(uri, "unit")
    failed.finish("FAILED")
    assert tracking.find_run(uri, failed.run_id)["status"] == "FAILED"
    ok = MLflowTracker.start(uri, "unit")
    ok.log_metrics({"x": 1.0}, step=0)
    ok.finish()
    assert tracking.find_run(uri, ok.run_id)["status"] == "FINISHED"
    with pytest.raises(UserError, match="must be one of"):
        ok.finish("DONE")


def test_missing_things_are_user_errors(store):
    uri, _ = store
    MLflowTracker.start(uri, "unit").finish()
    with pytest.raises(UserError, match="no MLflow experiment 'absent'.*experiments: .*unit"):
        tracking.search_runs(uri, "absent")
    with pytest.raises(UserError, match="no MLflow run with id"):
        tracking.find_run(uri, "f" * 32)
    with pytest.raises(UserError, match="not allowed"):
        tracking.search_runs(uri, "unit", parent_run_id="x' OR '1'='1")
    with pytest.raises(UserError, match="must not be empty"):
        MLflowTracker.start(uri, "")


def test_looking_up_a_store_that_does_not_exist_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'typo.db'}"
    lookups = [lambda: tracking.find_run(uri, "f" * 32), lambda: tracking.metric_history(uri, "f" * 32, "lr"),
               lambda: tracking.log_metrics_to_run(uri, "f" * 32, {"x": 1.0}, step=0),
               lambda: tracking.download_artifact(uri, "f" * 32, "config.json", str(tmp_path / "out"))]
    for lookup in lookups:
        with pytest.raises(UserError, match="no MLflow run with id 'f+': there is no MLflow store at sqlite"):
            lookup()
    with pytest.raises(UserError, match="no MLflow experiment 'smoke': there is no MLflow store"):
        tracking.search_runs(uri, "smoke")
    assert list(tmp_path.iterdir()) == []


def test_experiment_is_reused_by_name_without_global_state(store):
    uri, _ = store
    a = MLflowTracker.start(uri, "shared")
    b = MLflowTracker.start(uri, "shared")
    a.finish()
    b.finish()
    assert a.experiment_id == b.experiment_id and a.run_id != b.run_id
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ


# --- environment tags -----------------------------------------------------------------------


def test_environment_tags(monkeypatch):
    import socket

    tags = tracking.run_environment_tags()
    for package in ("ray", "torch", "timm", "mlflow"):
        assert tags[f"version.{package}"] == importlib.metadata.version(package)
    assert tags["hardware.cpu_count"] == str(os.cpu_count())
    gpus = [] if tags["hardware.gpus"] == "none" else tags["hardware.gpus"].split(", ")
    assert int(tags["hardware.gpu_count"]) == len(gpus)
    assert socket.gethostname() not in tags.values()
    here = pathlib.Path(tracking.__file__).parent
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    monkeypatch.setenv("PATH", "")  # no git at all: still a value, no failure
    assert tracking.run_environment_tags()["mlflow.source.git.commit"] == "unknown"
