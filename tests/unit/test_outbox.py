"""Metric rows on their way to MLflow (tracking/outbox.py) and a store that fails, against a real
SQLite store and a real closed port: rows held until released, sent once however often they are
sent, kept while the store is away; a failure is one line naming the store and the cause."""

import socket

import pytest
from mlflow import MlflowClient

from lejepa_platform.errors import TrackingError
from lejepa_platform.tracking import MetricsOutbox, MLflowTracker, wait_for_server
from lejepa_platform.tracking.outbox import STAMP, send_rows
from lejepa_platform.tracking.store import open_client

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")]


@pytest.fixture(autouse=True)
def _quick_client(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('outbox') / 'mlflow.db'}"


@pytest.fixture
def closed_port() -> str:
    """An HTTP URI on this machine where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def rows(*steps: int) -> list[dict[str, float]]:
    return [{"loss": 1.0 / step, "lr": 0.1 * step, "step": step} for step in steps]


def stored(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    """Every stored point of `key`, duplicates included."""
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_rows_are_sent_once_released_and_once_however_often_they_are_sent(store):
    tracker = MLflowTracker.start(store, "outbox")
    outbox = MetricsOutbox(store, tracker.run_id, "loss")
    outbox.add(rows(1, 2, 3))
    sent = outbox.undelivered()  # what a checkpoint taken now would keep
    assert [r["step"] for r in sent] == [1, 2, 3] and all(STAMP in r for r in sent)
    outbox.release()
    outbox.close()
    assert stored(store, tracker.run_id) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert outbox.undelivered() == []

    # The checkpoint's rows sent again (a restarted worker, the driver at the end of the run)
    assert tracker.deliver([*sent, *rows(4)], "loss") == 1  # steps the run holds are skipped
    assert send_rows(open_client(store), tracker.run_id, sent, after=0) == 3  # forced: same stamps, stored once
    assert stored(store, tracker.run_id) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [s for s, _ in stored(store, tracker.run_id, "lr")] == [1, 2, 3, 4]


def test_held_rows_wait_for_their_checkpoint(store):
    tracker = MLflowTracker.start(store, "outbox")
    outbox = MetricsOutbox(store, tracker.run_id, "loss")
    outbox.add(rows(1, 2))
    outbox.close(wait_s=0.5)
    assert stored(store, tracker.run_id) == []
    assert [r["step"] for r in outbox.undelivered()] == [1, 2]


def test_rows_wait_in_the_outbox_while_the_store_is_away(closed_port, capsys):
    outbox = MetricsOutbox(closed_port, "0123456789abcdef", "loss")
    outbox.add(rows(1, 2, 3))
    outbox.release()
    first = outbox.undelivered()
    outbox.close(wait_s=1.0)
    assert outbox.undelivered() == first  # same rows, same stamps: a later send stores them once
    err = capsys.readouterr().err
    assert f"MLflow store {closed_port} could not read a metric: connection refused" in err
    assert "3 metric rows did not reach the store" in err and "kept in the last checkpoint" in err


def test_nowhere_keeps_rows_only_until_released():
    outbox = MetricsOutbox.nowhere()
    outbox.add(rows(1, 2))
    assert [r["step"] for r in outbox.undelivered()] == [1, 2]
    outbox.release()
    outbox.set_tags({"a": "b"})
    outbox.close()
    assert outbox.undelivered() == []


def test_a_store_that_is_away_is_one_line_naming_it_and_the_cause(closed_port):
    with pytest.raises(TrackingError, match=rf"^MLflow store {closed_port} could not get run: connection refused$"):
        open_client(closed_port).get_run("0123456789abcdef")
    with pytest.raises(TrackingError, match=rf"^MLflow server {closed_port} did not answer for 0.5 s: connection ref"):
        wait_for_server(closed_port, 0.5)
    wait_for_server("sqlite:///nowhere.db", 60.0)  # a file store is no server: nothing to wait for
