"""Clusters for the multi-node e2e tests, simulated on one machine.

- `local_cluster`: a Ray head (`ray start --head`); `RayCluster.add_nodes` joins more nodes with
  `ray start --address`, each with its own raylet, object store and CPUs. With `autoscaling`
  the head also runs an autoscaler whose "cloud" is Ray's fake multi-node provider: it adds nodes
  as local processes when work is pending and removes them once idle.
- `mlflow_server`: a real MLflow tracking server on 127.0.0.1 with a SQLite store; its artifacts
  in a local folder, or proxied to a bucket as cluster.yaml runs it. It can be killed and started
  again on the same port (an outage).
- `moto_server`: moto's S3 API on 127.0.0.1, the stand-in for a bucket (`s3_env` points every
  client at it); it can be frozen (SIGSTOP) for an outage of the object store.
- `pretrain_on` / `run_on`: a driver process connected to such a cluster.
- `watch_train_workers`: which node runs each Ray Train worker, and a worker killed on cue.

Everything is started in a new session and stopped by process group: `ray stop` cannot be scoped
to one cluster (it ends every Ray process on the host, other clusters included). Each cluster has
its own temporary directory, free ports and authentication token, so several can run side by side.
Nothing here connects Ray in the calling process; a pytest session may already be connected to
another cluster, and a process holds one connection at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from lejepa_platform.config import RunConfig, to_dict

BIN = Path(sys.executable).parent
HEAD_NODE_TYPE = "ray.head.default"
"""The head's node type name, fixed by the fake multi-node provider."""
WORKER_NODE_TYPE = "cpu"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    """This process's environment without any cluster address or tracking URI, telemetry off."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               RAY_TRAIN_ENABLE_PRINT_PATCH="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# Process groups


def _processes() -> dict[int, tuple[int, int, bytes]]:
    """Every live (non-zombie) process: pid -> (parent pid, process group, command line), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return table


def _family(pgids: list[int], marker: bytes | None) -> tuple[set[int], set[int]]:
    """Live processes of these groups (or whose command line holds `marker`), and their live
    descendants outside them (Ray workers lead process groups of their own)."""
    table = _processes()
    members = {pid for pid, (_, group, cmdline) in table.items()
               if group in pgids or (marker is not None and marker in cmdline)}
    family, grew = set(members), True
    while grew:
        children = {pid for pid, (parent, _, _) in table.items() if parent in family} - family
        family |= children
        grew = bool(children)
    return members, family - members


def stop_groups(pgids: list[int], marker: bytes | None = None, grace_s: float = 3.0) -> None:
    """SIGTERM process groups and their descendants, then SIGKILL whatever is left after `grace_s`.

    Descendants outside the groups go first, while the raylet that started them still runs to
    reap them (orphans of this machine's init stay behind as zombies). They are noted before any
    signal: once re-parented, a worker can no longer be traced back to its group. Processes whose
    command line holds `marker` count as members too: a Ray worker's names its cluster's
    temporary directory, which also catches one spawned while its raylet was shutting down.
    """
    members, outsiders = _family(pgids, marker)

    def living(pids: set[int]) -> set[int]:
        return pids & set(_processes())

    def everything() -> set[int]:
        return living(members | outsiders).union(*_family(pgids, marker))

    for targets, sig, wait_s in ((lambda: living(outsiders), signal.SIGTERM, grace_s),
                                 (everything, signal.SIGTERM, grace_s), (everything, signal.SIGKILL, 5.0)):
        for pid in targets():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while targets() and time.monotonic() < deadline:
            time.sleep(0.2)
    if everything():
        raise RuntimeError(f"processes survived SIGKILL: {sorted(everything())}")


def _start_in_new_group(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `cmd` as the leader of a new session, so that its group holds everything it spawns."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait_for(ready: Callable[[], bool], timeout_s: float, what: str,
              failed: Callable[[], bool] = lambda: False) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if failed():
            raise RuntimeError(f"{what} failed to start")
        time.sleep(0.5)
    raise TimeoutError(f"gave up waiting {timeout_s:g} s for {what}")


def _http_ok(url: str, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Ray


_ALIVE_NODES = """
import json, sys, time
from ray.util.state import list_nodes
address, period = sys.argv[1], float(sys.argv[2])
while True:
    alive = list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    print(json.dumps({"time": time.time(), "alive": len(alive)}), flush=True)
    if period <= 0:
        break
    time.sleep(period)
"""


@dataclasses.dataclass
class RayCluster:
    """A Ray cluster started by this module; `stop()` ends every process it started."""

    temp_dir: Path
    address: str
    """GCS address for `ray.init(address=...)` / `pretrain(..., address=...)`."""
    dashboard_url: str
    client_env: dict[str, str]
    """Environment for a process that connects to this cluster (it carries the cluster's token)."""
    groups: list[int] = dataclasses.field(default_factory=list)

    def add_nodes(self, *num_cpus: int) -> None:
        """Join one node per entry, offering that many CPUs, with `ray start --address` (each its
        own raylet and object store; `ray start` returns once the node is registered). One at a
        time: nodes starting together on one machine take the same socket names in the shared
        session directory, and fail."""
        for cpus in num_cpus:
            cmd = [str(BIN / "ray"), "start", f"--address={self.address}", f"--num-cpus={cpus}",
                   "--object-store-memory=100000000", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={free_port()}"]
            proc = _start_in_new_group(cmd, self.client_env, self.temp_dir / "nodes.log")
            self.groups.append(proc.pid)
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"ray start --address failed: {(self.temp_dir / 'nodes.log').read_text()[-3000:]}")

    def driver_env(self) -> dict[str, str]:
        """`client_env` plus RAY_ADDRESS, so that Ray APIs called without an address (the state
        API) find this cluster rather than another one running on the machine."""
        return dict(self.client_env, RAY_ADDRESS=self.address)

    def alive_nodes(self) -> int:
        """How many nodes are alive now (asked from a separate process)."""
        out = subprocess.run([sys.executable, "-c", _ALIVE_NODES, self.dashboard_url, "0"], env=self.client_env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"listing nodes failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])["alive"]

    @contextlib.contextmanager
    def node_counts(self, period_s: float = 0.5) -> Iterator[list[tuple[float, int]]]:
        """Sample (wall time, alive nodes) every `period_s` from a watcher process while inside."""
        samples: list[tuple[float, int]] = []
        watcher = subprocess.Popen([sys.executable, "-c", _ALIVE_NODES, self.dashboard_url, str(period_s)],
                                   env=self.client_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        def read() -> None:
            for line in watcher.stdout:
                sample = json.loads(line)
                samples.append((sample["time"], sample["alive"]))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield samples
        finally:
            watcher.kill()
            watcher.wait()
            reader.join(timeout=5)

    def stop(self) -> None:
        """Stop every process group this cluster started, then delete its temporary directory."""
        try:
            stop_groups(self.groups, marker=str(self.temp_dir).encode())
        finally:
            self.groups.clear()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def fake_autoscaling_config(gcs_port: int, *, head_cpus: int, worker_cpus: int, max_workers: int,
                            idle_timeout_minutes: float) -> dict[str, Any]:
    """Cluster-launcher config for Ray's fake multi-node provider: nodes are local processes.

    Node updaters are off: they run setup commands over SSH, and the fake provider refuses the
    tag updates they make (each new node would be torn down as a failed launch).
    Nodes are told apart by id rather than address: they all share this machine's address, and
    keyed by address the autoscaler never sees a fake node come up, so never finds one idle.
    """
    return {
        "cluster_name": "fake",
        "max_workers": max_workers,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "launch_multiple": True,
                     "disable_node_updaters": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "nobody"},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {"resources": {"CPU": worker_cpus}, "node_config": {}, "min_workers": 0,
                               "max_workers": max_workers},
        },
        # The launcher's keys for copying files and running setup: nothing to do for local nodes.
        "file_mounts": {}, "cluster_synced_files": [], "worker_setup_commands": [], "worker_start_ray_commands": [],
    }


def start_head(*, num_cpus: int, autoscaling: dict[str, Any] | None = None,
               env: dict[str, str] | None = None) -> RayCluster:
    """`ray start --head` in a fresh temporary directory, with free ports and its own token.

    `autoscaling`: keyword arguments of `fake_autoscaling_config` (worker_cpus, max_workers,
    idle_timeout_minutes); the head then runs the autoscaler with the fake provider.
    `env`: more environment for every node and driver of the cluster (e.g. `s3_env`).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rt"))  # short: Ray's socket paths must fit in 107 bytes
    port, dashboard_port = free_port(), free_port()
    client_env = quiet_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **(env or {}))
    head_env = dict(client_env)
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    if autoscaling is not None:
        config_path = temp_dir / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(fake_autoscaling_config(port, head_cpus=num_cpus, **autoscaling)))
        cmd.append(f"--autoscaling-config={config_path}")
        head_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    proc = _start_in_new_group(cmd, head_env, temp_dir / "head.log")
    cluster = RayCluster(temp_dir=temp_dir, address="", dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                         client_env=client_env, groups=[proc.pid])
    try:
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start --head failed: {(temp_dir / 'head.log').read_text()[-3000:]}")
        cluster.address = (temp_dir / "ray_current_cluster").read_text().strip()
        _wait_for(lambda: _http_ok(f"{cluster.dashboard_url}/api/version", client_env["RAY_AUTH_TOKEN"]), 60,
                  "the Ray dashboard")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def local_cluster(**kwargs: Any) -> Iterator[RayCluster]:
    """`start_head(**kwargs)`, stopped on exit whatever happens."""
    cluster = start_head(**kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------
# Drivers


_PRETRAIN = """
import json, sys
from lejepa_platform.config import RunConfig
from lejepa_platform.overrides import from_dict
from lejepa_platform.errors import RunFailed
from lejepa_platform.run.launch import pretrain
args = json.loads(sys.argv[1])
try:
    result = pretrain(from_dict(RunConfig, args["config"]), resume=args["resume"], address=args["address"], quiet=True)
except RunFailed as err:
    result = {"failed": str(err)}
with open(args["out"], "w") as out:  # not stdout: Ray's threads print there too
    out.write(json.dumps(result, default=str))
"""


def pretrain_on(cluster: RayCluster, cfg: RunConfig, cwd: Path, *, resume: str | None = None,
                timeout_s: float = 240) -> dict[str, Any]:
    """Run `pretrain(cfg, resume=..., address=cluster)` in a driver process on this machine (the head).

    Returns the run's summary, or {"failed": message} when it raised RunFailed. What the driver
    prints is kept in `cwd`/driver.log.
    """
    result = cwd / "driver-result.json"
    result.unlink(missing_ok=True)
    payload = {"address": cluster.address, "config": to_dict(cfg), "resume": resume, "out": str(result)}
    with open(cwd / "driver.log", "a") as log:
        out = subprocess.run([sys.executable, "-c", _PRETRAIN, json.dumps(payload)], env=cluster.driver_env(),
                             cwd=cwd, stdout=log, stderr=log, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"the driver exited with {out.returncode}:\n{(cwd / 'driver.log').read_text()[-4000:]}")
    return json.loads(result.read_text())


TRAIN_WORKER_TITLE = b"ray::RayTrainWorker"
"""How a Ray Train worker process names itself (Ray sets the process title to its actor class)."""


def train_worker_processes(cluster: RayCluster) -> dict[int, int]:
    """The cluster's Ray Train worker processes now: pid -> process group of the node running it.

    A worker leads its own process group; its parent is the raylet of its node, which is in the
    group of the `ray start` that made the node (nodes added by the fake autoscaler are made by
    the head's autoscaler, so they share the head's group).
    """
    table = _processes()
    found = {}
    for pid, (parent, _, cmdline) in table.items():
        node_group = table.get(parent, (0, 0, b""))[1]
        if cmdline.startswith(TRAIN_WORKER_TITLE) and node_group in cluster.groups:
            found[pid] = node_group
    return found


@dataclasses.dataclass
class WorkerWatch:
    """What `watch_train_workers` saw: every worker process (pid -> node's group), and the kill."""

    workers: dict[int, int] = dataclasses.field(default_factory=dict)
    killed: list[int] = dataclasses.field(default_factory=list)


def registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for the run (its resume snapshot).

    A checkpoint directory lands in storage before the controller records it in
    `checkpoint_manager_snapshot.json`; a run killed in between resumes from the previous
    recorded checkpoint, so "after a checkpoint" means "after it is in the snapshot".
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return []
    return [int(result["metrics"]["step"]) for result in snapshot.get("checkpoint_results", [])]


def kill_workers_after(run_dir: Path, min_steps: list[int], killed: list[int]) -> threading.Thread:
    """For each step in `min_steps`, in order: once Ray Train has registered a checkpoint at >= that
    step, SIGKILL one live Train worker of this process's cluster (pids appended to `killed`).

    Workers are looked up when the checkpoint is there, so a restarted group's new workers are found
    (the state API may still list a torn-down worker as alive: pids that no longer exist are skipped).
    """
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # other Ray clusters may run on this machine

    def live_workers() -> list[int]:
        actors = list_actors(address=address, raise_on_missing_output=False,
                             filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return [a.pid for a in actors if a.pid not in killed and Path(f"/proc/{a.pid}").exists()]

    def watch() -> None:
        deadline = time.monotonic() + 300
        pending = list(min_steps)
        while time.monotonic() < deadline and pending:
            if any(s >= pending[0] for s in registered_checkpoint_steps(run_dir)):
                for pid in reversed(live_workers()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        pending.pop(0)
                        break
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def watch_train_workers(cluster: RayCluster, *, kill_after: tuple[Path, int] | None = None,
                        period_s: float = 0.1) -> Iterator[WorkerWatch]:
    """Record the cluster's Ray Train worker processes while inside (from /proc: no Ray API).

    With `kill_after=(run_dir, step)`, SIGKILL one worker as soon as Ray Train has registered a
    checkpoint at >= step; workers are known before that, so the kill lands right after.
    """
    watch, stop = WorkerWatch(), threading.Event()

    def due() -> bool:
        return bool(kill_after) and not watch.killed and max(registered_checkpoint_steps(kill_after[0]),
                                                             default=-1) >= kill_after[1]

    def look() -> None:
        while not stop.is_set():
            current = train_worker_processes(cluster)
            watch.workers.update(current)
            if current and due():
                victim = max(current)
                os.kill(victim, signal.SIGKILL)
                watch.killed.append(victim)
            stop.wait(period_s)

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(timeout=10)


def run_on(cluster: RayCluster, code: str, payload: Any, timeout_s: float = 120) -> Any:
    """Run `code` in a process connected to the cluster; it reads json.loads(sys.argv[1]) and
    prints its result as one JSON line last."""
    prelude = f"from lejepa_platform.ray_env import init_ray\ninit_ray({cluster.address!r})\n"
    out = subprocess.run([sys.executable, "-c", prelude + code, json.dumps(payload)], env=cluster.driver_env(),
                         capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"the driver exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# MLflow


@dataclasses.dataclass
class MLflowServer:
    """A tracking server started by `mlflow_server`; `uri` is the tracking URI for clients."""

    uri: str
    command: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server (again, on the same port and store: a restart after `kill`)."""
        self.process = _start_in_new_group(self.command, self.env, self.log)

    def kill(self) -> None:
        """SIGKILL the server and its helpers: clients get connection refused until `start`."""
        stop_groups([self.process.pid], grace_s=0.0)
        self.process.wait()

    def wait_healthy(self, timeout_s: float = 90.0) -> None:
        _wait_for(lambda: _http_ok(f"{self.uri}/health"), timeout_s, "the MLflow server",
                  failed=lambda: self.process.poll() is not None)


@contextlib.contextmanager
def mlflow_server(directory: Path, *, wait: bool = True, artifacts: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[MLflowServer]:
    """`mlflow server` on 127.0.0.1 with a SQLite store; artifacts under `directory`, or proxied
    to `artifacts` (e.g. s3://bucket/mlflow, with `env` from `s3_env`) as cluster.yaml runs it.

    On entry it has answered /health, unless `wait=False` (start other things meanwhile, then
    call `wait_healthy`). The server and its helper processes are stopped together on exit.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
           "--artifacts-destination", artifacts or str(directory / "artifacts")]
    server = MLflowServer(uri=f"http://127.0.0.1:{port}", command=cmd, env=quiet_env(**(env or {})),
                          log=directory / "server.log")
    server.start()
    try:
        if wait:
            server.wait_healthy()
        yield server
    finally:
        if server.process.poll() is None:
            server.kill()


# --------------------------------------------------------------------------------------------
# S3


DUMMY_SECRET = "lejepa-moto-secret-7f3a9c"
"""The secret access key every S3 client of the tests uses: moto takes any, and tests grep for it."""
NO_EGRESS = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
"""For processes the tests start: boto3 and requests traffic to anything but this machine goes to a
dead proxy, so a client that ignored the S3 endpoint fails here instead of reaching AWS."""


def s3_env(endpoint: str, directory: Path) -> dict[str, str]:
    """The standard variables that point pyarrow, boto3, MLflow and Ray Train at the S3 API at
    `endpoint`, with dummy credentials; no AWS configuration file or instance metadata is read."""
    return {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "lejepa-test",
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(directory / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(directory / "no-aws-credentials")}


@dataclasses.dataclass
class MotoServer:
    """moto's S3 API started by `moto_server`."""

    endpoint: str
    process: subprocess.Popen

    def client(self):
        """A boto3 S3 client for this server (explicit endpoint: it never reaches AWS)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="lejepa-test", aws_secret_access_key=DUMMY_SECRET)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The object store unreachable while inside: the server is stopped (SIGSTOP), so clients
        connect and then get no answer until their timeouts; it resumes, state intact, on exit."""
        os.killpg(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def moto_server(directory: Path) -> Iterator[MotoServer]:
    """moto's S3 server on a free loopback port (its state lives in memory), stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    server = MotoServer(endpoint=f"http://127.0.0.1:{port}",
                        process=_start_in_new_group(cmd, quiet_env(), directory / "moto.log"))
    try:
        _wait_for(lambda: _http_ok(f"{server.endpoint}/moto-api/"), 60, "moto's S3 server",
                  failed=lambda: server.process.poll() is not None)
        yield server
    finally:
        stop_groups([server.process.pid])
        server.process.wait()
