"""What `lejepa ... --json` leaves on stdout: the result alone, whatever else writes there while the
command runs (Python code, native code on file descriptor 1, a child process), and no password of
a URI on either stream. The command itself is replaced by a noisy one; the rest is the real CLI."""

import json
import os
import subprocess
import sys

import pytest

from lejepa_platform import cli
from lejepa_platform.errors import TrackingError

pytestmark = pytest.mark.unit

URI = "http://alice:hunter2@mlflow.example.com:5000"


def noisy(args) -> dict:
    print("View run at http://127.0.0.1:5000/#/experiments/1")
    os.write(1, b"native write\n")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    return {"tracking_uri": URI, "steps": 3}


def test_json_stdout_holds_the_result_alone(monkeypatch, capfd):
    monkeypatch.setattr(cli, "_shards_inspect", noisy)
    assert cli.main(["shards", "inspect", "anything", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"tracking_uri": "http://alice:***@mlflow.example.com:5000", "steps": 3}
    assert {"View run at http://127.0.0.1:5000/#/experiments/1", "native write", "child process"} <= set(err.splitlines())
    assert "hunter2" not in out + err


def test_without_json_the_noise_stays_where_it_was_written(monkeypatch, capfd):
    monkeypatch.setattr(cli, "_shards_inspect", noisy)
    assert cli.main(["shards", "inspect", "anything"]) == 0
    out, _ = capfd.readouterr()
    assert out.splitlines()[:3] == ["View run at http://127.0.0.1:5000/#/experiments/1", "native write", "child process"]


def test_a_tracking_failure_is_one_line_exit_1_and_nothing_on_stdout(monkeypatch, capfd):
    def failing(args) -> dict:
        raise TrackingError(f"MLflow store {URI} could not store an artifact: HTTP 500 (retried)")

    monkeypatch.setattr(cli, "_shards_inspect", failing)
    assert cli.main(["shards", "inspect", "anything", "--json"]) == 1
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ("lejepa: error: MLflow store http://alice:***@mlflow.example.com:5000 could not store an "
                   "artifact: HTTP 500 (retried)\n")
