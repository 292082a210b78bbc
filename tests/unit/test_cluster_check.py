"""`lejepa cluster check`: the shipped cluster.yaml passes Ray's schema and the project's checks;
each kind of broken config fails with one line that names the key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lejepa_platform.cluster import check_cluster_config
from lejepa_platform.errors import UserError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
LEJEPA = Path(sys.executable).parent / "lejepa"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def write(tmp_path: Path, config: dict, name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_shipped_cluster_yaml_passes_and_has_the_promised_shape():
    result = check_cluster_config(str(CLUSTER_YAML))
    assert result["ok"] is True and result["provider"] == "aws"
    types = result["node_types"]
    head = types[result["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu_workers = [t for name, t in types.items()
                   if name != result["head_node_type"] and t["resources"].get("GPU", 0) == 0]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert len(cpu_workers) == 1 and cpu_workers[0]["resources"]["CPU"] >= 1
    assert [c.split(":")[0] for c in result["checks"]] == ["ray schema", "network", "bind addresses", "tracking"]
    for node in ("head", "gpu", "cpu"):
        assert f"available_node_types.{node}.node_config.SecurityGroupIds[0]" in result["placeholders"]


def test_placeholders_are_exactly_the_change_me_values(shipped, tmp_path):
    filled = yaml.safe_load(yaml.safe_dump(shipped).replace("CHANGE_ME", "filled"))
    assert check_cluster_config(write(tmp_path, filled))["placeholders"] == []
    with_one = copy.deepcopy(filled)
    with_one["provider"]["region"] = "CHANGE_ME-region"
    assert check_cluster_config(write(tmp_path, with_one))["placeholders"] == ["provider.region"]


def _typo_max_worker(c):
    c["available_node_types"]["gpu"]["max_worker"] = c["available_node_types"]["gpu"].pop("max_workers")


def _unknown_head(c):
    c["head_node_type"] = "hed"


def _open_ingress(c):
    c["provider"]["security_group"] = {"IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}


def _open_ingress_ipv6(c):
    c["provider"]["security_group"] = {"IpPermissions": [
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}


def _no_security_group(c):
    del c["available_node_types"]["cpu"]["node_config"]["SecurityGroupIds"]


def _replace_in(key: str, old: str, new: str) -> Callable[[dict], None]:
    def mutate(c):
        assert any(old in cmd for cmd in c[key]), f"{old!r} not in {key}"
        c[key] = [cmd.replace(old, new) for cmd in c[key]]
    return mutate


def _no_head_start_commands(c):
    del c["head_start_ray_commands"]  # Ray's default starts the dashboard on every interface


def _string_max_workers(c):
    c["max_workers"] = "eight"


BROKEN = {
    "typo in a node-type key": (
        _typo_max_worker, "available_node_types.gpu: Additional properties are not allowed ('max_worker' was unexpected)"),
    "unknown head node type": (
        _unknown_head, "Got head_node_type = 'hed'; node types: cpu, gpu, head"),
    "wrong type": (_string_max_workers, "max_workers: 'eight' is not of type 'integer'"),
    "ingress from 0.0.0.0/0": (
        _open_ingress, "provider.security_group.IpPermissions[0] admits port 22 from 0.0.0.0/0"),
    "ingress from ::/0": (_open_ingress_ipv6, "IpPermissions[0] admits all traffic from ::/0"),
    "no own security group": (
        _no_security_group, "available_node_types.cpu.node_config sets no SecurityGroupIds"),
    "dashboard on every interface": (
        _replace_in("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host 0.0.0.0"),
        "head_start_ray_commands[2] starts the Ray dashboard with --dashboard-host=0.0.0.0"),
    "default start commands": (
        _no_head_start_commands,
        "head_start_ray_commands[1] (Ray's default) starts the Ray dashboard with --dashboard-host=0.0.0.0"),
    "mlflow on every interface": (
        _replace_in("head_start_ray_commands", '--host "$HEAD_IP"', "--host=0.0.0.0"),
        "starts the MLflow server with --host 0.0.0.0"),
    "mlflow on loopback only": (
        _replace_in("head_start_ray_commands", '--host "$HEAD_IP"', ""),
        "head_start_ray_commands[1] starts the MLflow server without --host"),
    "file-path tracking uri": (
        _replace_in("worker_start_ray_commands", "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000",
                    "MLFLOW_TRACKING_URI=/home/ubuntu/mlruns"),
        "worker_start_ray_commands[1] sets MLFLOW_TRACKING_URI=/home/ubuntu/mlruns, a local path"),
    "sqlite tracking uri": (
        _replace_in("head_start_ray_commands", "MLFLOW_TRACKING_URI=http://$HEAD_IP:5000",
                    "MLFLOW_TRACKING_URI='sqlite:///home/ubuntu/mlflow.db'"),
        "sets MLFLOW_TRACKING_URI=sqlite:///home/ubuntu/mlflow.db, a sqlite URI"),
    "loopback tracking uri": (
        _replace_in("worker_start_ray_commands", "http://$RAY_HEAD_IP:5000", "http://127.0.0.1:5000"),
        "MLFLOW_TRACKING_URI=http://127.0.0.1:5000, a loopback address"),
    "file-path tracking uri in shared setup": (
        lambda c: c["setup_commands"].append("echo 'export MLFLOW_TRACKING_URI=file:///tmp/mlruns' >> ~/lejepa.env"),
        "setup_commands[4] sets MLFLOW_TRACKING_URI=file:///tmp/mlruns, a file URI"),
    "file-path tracking uri in a node type's own setup": (
        lambda c: c["available_node_types"]["cpu"].update(worker_setup_commands=["export MLFLOW_TRACKING_URI=mlruns"]),
        "available_node_types.cpu.worker_setup_commands[0] sets MLFLOW_TRACKING_URI=mlruns, a local path"),
    "workers without tracking uri": (
        _replace_in("worker_start_ray_commands", "export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000 ", "export "),
        "the worker nodes get no MLFLOW_TRACKING_URI"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_variant_fails_with_one_clear_line(case, shipped, tmp_path):
    mutate, expected = BROKEN[case]
    config = copy.deepcopy(shipped)
    mutate(config)
    path = write(tmp_path, config)
    with pytest.raises(UserError) as info:
        check_cluster_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_unreadable_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_cluster_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        check_cluster_config(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        check_cluster_config(str(bad))


# --------------------------------------------------------------------------------------------
# Recipes: per-worker resources against node types. The shipped cluster offers head {CPU: 0},
# gpu {CPU: 48, GPU: 4} x 4 and cpu {CPU: 16} x 4, with a global budget of 8 worker nodes.

RECIPE = """\
from lejepa_platform.config import DataConfig, RunConfig, TrainConfig


def config():
    return RunConfig(train=TrainConfig(workers={workers}, use_gpu={gpu}, cpus_per_worker={cpus}),
                     data=DataConfig(batch_size={batch}))
"""


def recipe(tmp_path: Path, workers: int, gpu: bool, cpus: float, name: str = "r.py") -> str:
    path = tmp_path / name
    path.write_text(RECIPE.format(workers=workers, gpu=gpu, cpus=cpus, batch=4 * workers))
    return str(path)


def test_gpu_recipe_fits_exactly_up_to_the_gpu_capacity(tmp_path):
    # 8 CPUs + 1 GPU per worker: min(48 // 8, 4 // 1) = 4 per gpu node, 4 nodes -> 16
    fits = recipe(tmp_path, workers=16, gpu=True, cpus=8, name="fits.py")
    line = check_cluster_config(str(CLUSTER_YAML), recipes=[fits])["checks"][-1]
    assert line == f"recipe {fits}: 16 workers of {{CPU: 8, GPU: 1}} fit (at most 16: gpu: 4/node x 4)"
    too_many = recipe(tmp_path, workers=17, gpu=True, cpus=8, name="too_many.py")
    with pytest.raises(UserError, match=r"train.workers = 17 .* fits at most 16 \(gpu: 4/node x 4; global max_workers = 8\)"):
        check_cluster_config(str(CLUSTER_YAML), recipes=[too_many])


def test_recipe_asking_for_more_than_any_node_offers_fails(tmp_path):
    huge = recipe(tmp_path, workers=2, gpu=True, cpus=64)
    with pytest.raises(UserError) as info:
        check_cluster_config(str(CLUSTER_YAML), recipes=[huge])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"recipe {huge!r} asks per worker for {{CPU: 64, GPU: 1}}, which no node type offers")
    assert "gpu {CPU: 48, GPU: 4}" in message


def test_cpu_recipe_capacity_shares_the_global_node_budget(shipped, tmp_path):
    # 4 CPUs per worker: gpu nodes hold 12, cpu nodes 4, the head (CPU 0) none.
    cpu = recipe(tmp_path, workers=10, gpu=False, cpus=4)
    line = check_cluster_config(str(CLUSTER_YAML), recipes=[cpu])["checks"][-1]
    assert line.endswith("(at most 64: gpu: 12/node x 4, cpu: 4/node x 4)")  # 12*4 + 4*4
    config = copy.deepcopy(shipped)
    config["max_workers"] = 5  # 4 gpu nodes, then only 1 cpu node is left in the budget
    line = check_cluster_config(write(tmp_path, config), recipes=[cpu])["checks"][-1]
    assert line.endswith("(at most 52: gpu: 12/node x 4, cpu: 4/node x 1)")


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_json_passes_and_broken_config_exits_2_with_one_line(shipped, tmp_path):
    ok = subprocess.run([str(LEJEPA), "cluster", "check", "cluster.yaml", "--json"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["ok"] is True and result["node_types"]["gpu"]["resources"] == {"CPU": 48, "GPU": 4}

    config = copy.deepcopy(shipped)
    _typo_max_worker(config)
    path = write(tmp_path, config)
    bad = subprocess.run([str(LEJEPA), "cluster", "check", path, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lejepa: error: {path}: available_node_types.gpu:")


def test_worker_nodes_start_ray_with_the_local_clusters_worker_settings(shipped):
    """cluster.yaml cannot import ray_env, so its worker start names the same raylet settings itself."""
    from lejepa_platform.ray_env import LOCAL_SYSTEM_CONFIG

    start = " ".join(shipped["worker_start_ray_commands"])
    for key, value in LOCAL_SYSTEM_CONFIG.items():
        text = str(int(value)) if isinstance(value, bool) else str(value)
        assert f"RAY_{key}={text}" in start, key
