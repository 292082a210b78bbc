"""The cloud path as a cluster user runs it, against a real S3 API (moto's server on loopback) and
a real MLflow server that proxies its artifacts to the bucket (as cluster.yaml runs it).

One journey, shared by the tests below: `lejepa shards build` to s3://, `lejepa pretrain` reading
them with its checkpoints in the bucket and a tracking URI that carries a token, SIGTERM after the
first checkpoint, `lejepa pretrain --resume` (during which the MLflow server is killed and started
again on the same port: an outage of the head's server), then `lejepa eval RUN --data s3://...`.
Every command runs in this process (the session's Ray cluster, started with the S3 variables by
the `cloud` fixture), and its stdout and stderr are kept as the file descriptors saw them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from clusters import DUMMY_SECRET
from lejepa_platform import cli
from lejepa_platform.data.shards import resolve_source
from lejepa_platform.run.evaluate import load_target
from lejepa_platform.run.storage import local_checkpoint
from lejepa_platform.tracking import find_run
from lejepa_platform.train.checkpoint import encoder_state, load_checkpoint

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "lejepa"
SHARDS = f"s3://{BUCKET}/shards/fm"
RUNS = f"s3://{BUCKET}/runs"
TOKEN = "tracking-token-5e1f0c"
"""A password in the tracking URI: it must never be written anywhere."""
STEPS, EVERY = 20, 5

TINY = ['model.backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "model.proj_hidden_dim=64", "model.proj_dim=16", "loss.num_slices=64", "data.global_views=2",
        "data.global_size=16", "data.local_views=0", "data.batch_size=32", "data.shuffle_buffer=64",
        f"data.source={SHARDS}", f"train.steps={STEPS}", "train.time_budget_s=0", "train.log_every=1",
        f"train.checkpoint_every={EVERY}", "train.workers=1", "train.cpus_per_worker=1", "train.torch_threads=1",
        f"train.storage_path={RUNS}", "track.experiment=cloud", "eval.enabled=false"]
"""One CPU worker, a 2-block ViT on 16 px views, every step logged, a checkpoint every 5 steps."""


@dataclasses.dataclass
class Outcome:
    """What a `lejepa` command left: its exit code and what reached file descriptors 1 and 2."""

    code: int
    out: str
    err: str


def lejepa(*args: str) -> Outcome:
    """`lejepa ARGS` in this process, its output kept at the file-descriptor level (what a shell or a
    Ray job would see, native writes and child processes included)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(list(args))
                out.flush()
                err.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        return Outcome(code, _read(out), _read(err))


def _read(handle: io.TextIOBase) -> str:
    handle.seek(0)
    return handle.read()


def one_document(outcome: Outcome) -> dict:
    """The command's stdout, which must be exactly one JSON document."""
    assert outcome.code == 0, outcome.err[-3000:]
    return json.loads(outcome.out)


def tracking_uri(server, token: str = "") -> str:
    return server.uri.replace("http://", f"http://lejepa:{token}@") if token else server.uri


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in (*TINY, *overrides)]


def registered_steps(s3, run: str) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for a run in the bucket (its resume snapshot)."""
    try:
        body = s3.get_object(Bucket=BUCKET, Key=f"runs/{run}/checkpoint_manager_snapshot.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return []
    return [int(r["metrics"]["step"]) for r in json.loads(body).get("checkpoint_results", [])]


def when(condition, action, timeout_s: float = 300) -> threading.Thread:
    """Run `action` in a thread as soon as `condition()` holds."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not condition():
            time.sleep(0.1)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def keys_under(s3, prefix: str) -> list[str]:
    """The bucket's objects under `prefix` (not the empty markers some writers leave for folders)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))


def logged(uri: str, run_id: str, key: str = "loss/total") -> list[int]:
    """Every step at which `key` was stored, duplicates included."""
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def shards_built(cloud, tmp_path_factory) -> Outcome:
    """256 real images of the embedded dataset, built straight into the bucket."""
    tmp = tmp_path_factory.mktemp("cloud-source")
    table = pq.ParquetFile(resolve_source("builtin:fashion-mnist-10k") / "part-00000.parquet").read_row_group(0)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in table.column("image").to_pylist()])
    np.savez(tmp / "d.npz", images=pixels, labels=table.column("label").to_numpy())
    return lejepa("shards", "build", str(tmp / "d.npz"), SHARDS, "--rows-per-shard", "64", "--json")


def run_id_of(s3, name: str) -> str | None:
    """The MLflow run id in a run's record in the bucket (None before the run has one)."""
    try:
        record = s3.get_object(Bucket=BUCKET, Key=f"runs/{name}/lejepa_run.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(record)["mlflow_run_id"]


def server_outage(cloud, name: str, *, after_step: int, back: bool) -> dict[str, int]:
    """Kill the MLflow server once it holds a row of run `name` past `after_step`; with `back`, start it
    again on the same port once a checkpoint newer than the last one at the kill is registered (so
    training went on without the server). Returns, as they happen, the checkpoint steps at the kill
    ("down_after") and at the restart ("trained_while_down")."""
    seen: dict[str, int] = {}

    def holds_a_row() -> bool:  # asked of MLflow alone: the bucket may be in an outage of its own
        runs = MlflowClient(cloud.server.uri).search_runs(
            [e.experiment_id for e in MlflowClient(cloud.server.uri).search_experiments()],
            filter_string=f"attributes.run_name = '{name}'")
        return bool(runs) and max(logged(cloud.server.uri, runs[0].info.run_id), default=0) > after_step

    def outage() -> None:
        cloud.server.kill()
        seen["down_after"] = max(registered_steps(cloud.s3, name), default=0)
        if not back:
            return
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and max(registered_steps(cloud.s3, name), default=0) <= seen["down_after"]:
            time.sleep(0.1)
        seen["trained_while_down"] = max(registered_steps(cloud.s3, name), default=0)
        cloud.server.start()

    when(holds_a_row, outage)
    return seen


@contextlib.contextmanager
def server_back_afterwards(server):
    """Whatever happens inside, the shared MLflow server answers again afterwards."""
    try:
        yield
    finally:
        if server.process.poll() is not None:
            server.start()
        server.wait_healthy()


@pytest.fixture(scope="module")
def journey(cloud, shards_built, tmp_path_factory) -> dict:
    """The pretraining stopped by SIGTERM after its first checkpoint, resumed through an MLflow
    server restart, then evaluated."""
    assert shards_built.code == 0, shards_built.err
    uri = tracking_uri(cloud.server, TOKEN)
    with contextlib.chdir(tmp_path_factory.mktemp("cloud-cwd")), server_back_afterwards(cloud.server):
        stopper = when(lambda: registered_steps(cloud.s3, "journey"), lambda: os.kill(os.getpid(), signal.SIGTERM))
        stopped = lejepa("pretrain", "--json", *sets("train.name=journey", f"track.uri={uri}"))
        stopper.join(timeout=5)
        stopped_at = max(logged(cloud.server.uri, run_id_of(cloud.s3, "journey")), default=0)
        outage = server_outage(cloud, "journey", after_step=stopped_at, back=True)
        resumed = lejepa("pretrain", "--json", "--resume", "journey", f"--set=train.storage_path={RUNS}",
                         f"--set=track.uri={uri}")
        run_id = one_document(resumed)["mlflow_run_id"]
        evaluated = lejepa("eval", run_id, "--data", SHARDS, "--protocol", "knn", "--tracking-uri", uri, "--json")
    return {"stopped": stopped, "resumed": resumed, "evaluated": evaluated, "run_id": run_id, "outage": outage,
            "commands": [shards_built, stopped, resumed, evaluated]}


def test_shards_are_built_into_the_bucket(cloud, shards_built):
    summary = one_document(shards_built)
    assert (summary["out"], summary["rows"], summary["shards"]) == (SHARDS, 256, 4)
    assert keys_under(cloud.s3, "shards/fm/") == [f"shards/fm/{n}" for n in
                                                  ("manifest.json", *(f"part-{i:05d}.parquet" for i in range(4)))]


def test_sigterm_then_resume_ends_at_exactly_train_steps_with_every_step_once(cloud, journey):
    stopped, resumed = journey["stopped"], journey["resumed"]
    assert stopped.code == 143 and stopped.out == ""
    assert f"lejepa pretrain --resume journey --set train.storage_path={RUNS}" in stopped.err
    summary = one_document(resumed)
    assert summary["steps"] == STEPS and summary["storage"] == f"{RUNS}/journey"
    run = find_run(cloud.server.uri, journey["run_id"])
    assert run["status"] == "FINISHED" and run["params"]["train.storage_path"] == RUNS
    for key in ("loss/total", "lr", "train/seconds"):
        assert logged(cloud.server.uri, journey["run_id"], key) == list(range(1, STEPS + 1)), key


def test_mlflow_server_killed_mid_run_and_restarted_loses_and_repeats_nothing(cloud, journey):
    """Killed during the resumed run once it had sent a row, started again on the same port once a
    newer checkpoint was registered: training went on meanwhile, and every step is in MLflow once."""
    outage = journey["outage"]
    assert outage["trained_while_down"] > outage["down_after"]
    assert find_run(cloud.server.uri, journey["run_id"])["status"] == "FINISHED"
    for key in ("loss/total", "probe/online_acc"):
        assert logged(cloud.server.uri, journey["run_id"], key) == list(range(1, STEPS + 1)), key


def test_checkpoints_live_in_the_bucket_and_load_from_it(cloud, journey):
    steps = registered_steps(cloud.s3, "journey")
    assert steps == [STEPS - EVERY, STEPS]  # keep_checkpoints = 2
    keys = keys_under(cloud.s3, "runs/journey/")
    assert "runs/journey/lejepa_run.json" in keys
    assert sum(k.endswith("/state.pt") for k in keys) == 2
    with local_checkpoint(f"{RUNS}/journey") as directory:  # the latest, fetched from the bucket
        state, cfg = load_checkpoint(directory)
    assert (state.step, state.finished, cfg.data.source) == (STEPS, True, SHARDS)
    evaluated_cfg, weights, run_id = load_target(f"{RUNS}/journey", cloud.server.uri)  # `lejepa eval s3://...`
    assert run_id is None and evaluated_cfg.model == cfg.model
    assert all(torch.equal(weights[k], v) for k, v in encoder_state(state.model).items())


def test_backbone_and_plots_reach_the_bucket_through_the_server(cloud, journey):
    run = find_run(cloud.server.uri, journey["run_id"])
    assert run["artifact_uri"].startswith("mlflow-artifacts:")  # proxied: clients never write the bucket
    stored = {k.rsplit("/artifacts/", 1)[1] for k in keys_under(cloud.s3, "mlflow/")
              if f"/{journey['run_id']}/artifacts/" in k}
    assert {"backbone.safetensors", "loss_curve.png", "config.json", "eval/evaluation.json", "eval/spectrum.png",
            "eval/patch_pca.png"} <= stored
    assert not list((cloud.root / "mlflow").rglob("*.safetensors"))  # nothing kept on the server's disk


def test_eval_reads_the_bucket_and_records_on_the_run(cloud, journey):
    report = one_document(journey["evaluated"])
    assert (report["data"], report["num_train"] + report["num_test"]) == (SHARDS, 256)
    for model in ("pretrained", "random_init", "raw_pixels"):
        assert 0.0 < report["models"][model]["knn_k20"] <= 1.0
    metrics = find_run(cloud.server.uri, journey["run_id"])["metrics"]
    assert metrics["eval/pretrained/knn_k20"] == pytest.approx(report["models"]["pretrained"]["knn_k20"])


def test_json_stdout_is_one_document_whatever_the_tracking_server(journey):
    """MLflow prints "View run ..." lines on stdout for an HTTP tracking server: not into the result."""
    for outcome in journey["commands"]:
        if outcome.code == 0:
            json.loads(outcome.out)
        else:
            assert outcome.out == ""
    printed = "".join(o.out + o.err for o in journey["commands"])
    assert "View run" not in printed
    assert "execution finished" not in printed and "Progress bars disabled" not in printed  # Ray Data's set-up


def test_no_secret_is_written_anywhere(cloud, journey, tmp_path):
    """Neither the tracking token nor the S3 secret key is in MLflow's params, tags or artifacts, in
    anything the run left in the bucket, in what the commands printed, or in Ray's logs."""
    import ray

    secrets = (TOKEN.encode(), DUMMY_SECRET.encode())
    client = MlflowClient(cloud.server.uri)
    run = client.get_run(journey["run_id"])
    texts = {f"param {k}": v for k, v in run.data.params.items()} | {f"tag {k}": v for k, v in run.data.tags.items()}
    texts |= {f"command {i}": o.out + o.err for i, o in enumerate(journey["commands"])}
    blobs = {path: path.read_bytes() for path in Path(client.download_artifacts(journey["run_id"], "", str(tmp_path)))
             .rglob("*") if path.is_file()}
    blobs |= {key: cloud.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys_under(cloud.s3, "runs/")}
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    blobs |= {path: path.read_bytes() for path in (session / "logs").rglob("*") if path.is_file()}
    assert len([b for b in blobs if str(b).endswith(("config.json", "lejepa_run.json"))]) >= 3
    leaks = [where for where, text in texts.items() if any(s.decode() in text for s in secrets)]
    leaks += [str(where) for where, blob in blobs.items() if any(s in blob for s in secrets)]
    assert leaks == []
    record = json.loads(cloud.s3.get_object(Bucket=BUCKET, Key="runs/journey/lejepa_run.json")["Body"].read())
    assert record["tracking_uri"] == tracking_uri(cloud.server, "***")


def test_a_server_that_cannot_store_artifacts_is_one_line_and_a_failed_run(cloud, shards_built):
    """The server answers HTTP 500 for every artifact (its bucket does not exist): one line names the
    server and the cause, the run is FAILED in MLflow, and nothing under its name is left in storage."""
    broken = cloud.broken
    broken.wait_healthy()
    outcome = lejepa("pretrain", "--json", *sets("train.name=no-artifacts", f"track.uri={broken.uri}"))
    client = MlflowClient(broken.uri)
    runs = client.search_runs([client.get_experiment_by_name("cloud").experiment_id])
    assert outcome.code == 1 and outcome.out == "" and "Traceback" not in outcome.err
    lines = [line for line in outcome.err.splitlines() if line.startswith("lejepa:")]
    assert len(lines) == 1 and lines[0].startswith(f"lejepa: error: MLflow store {broken.uri} could not store")
    assert "HTTP 500" in lines[0] and "--artifacts-destination" in lines[0]
    assert [(r.info.run_name, r.info.status) for r in runs] == [("no-artifacts", "FAILED")]
    assert keys_under(cloud.s3, "runs/no-artifacts/") == []


def test_sweep_with_its_storage_in_the_bucket_records_its_trials(cloud, shards_built, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ['model.backbone_kwargs={"img_size": 16, "patch_size": 8, "depth": 1}', "model.proj_hidden_dim=32",
            "model.proj_dim=16", "data.global_size=16", "data.batch_size=16", "data.shuffle_buffer=0",
            "train.steps=2", "train.log_every=1", "train.checkpoint_every=2", "train.torch_threads=1",
            "eval.enabled=false", f"data.source={SHARDS}", f"train.storage_path={RUNS}",
            f"track.uri={cloud.server.uri}", "track.experiment=cloud-sweep"]
    outcome = lejepa("sweep", str(ROOT / "sweeps" / "smoke.py"), "--json", *[f"--set=base.{o}" for o in tiny],
                     '--set=sweep.space={"loss.lam": {"grid": [0.02]}}')
    summary = one_document(outcome)
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED"]
    children = MlflowClient(cloud.server.uri).search_runs(
        [MlflowClient(cloud.server.uri).get_experiment_by_name("cloud-sweep").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert [(c.data.params["loss.lam"], c.info.status) for c in children] == [("0.02", "FINISHED")]
    assert logged(cloud.server.uri, children[0].info.run_id) == [1, 2]
    keys = keys_under(cloud.s3, "runs/smoke")
    assert any(k.endswith("/lejepa_sweep/lejepa_run.json") for k in keys)  # the sweep's own record
    assert any(k.startswith("runs/smoke/") and "experiment_state" in k for k in keys)  # Tune's, for --resume
    assert sum(k.endswith("/state.pt") for k in keys) == 1  # the trial's checkpoint, in the bucket
    assert not Path("s3:").exists()  # nothing written to a local folder named after the URI
    analysis = {f.path for f in MlflowClient(cloud.server.uri).list_artifacts(summary["parent_run_id"], "analysis")}
    assert "analysis/report.md" in analysis
