"""`lejepa bench e2e`: training steps of the whole platform path against a bare PyTorch loop in the
same training time, with the same model, batch, views, optimizer and schedule.

Platform side: `pretrain` (data tasks + Ray Train, MLflow, checkpoints; evaluation off) in a fresh
Python process that starts its own local Ray cluster, as `lejepa pretrain` does without one.
Bare side: one fresh Python process with the job's environment variables (`ray_env.job_env_vars`:
the same libgomp spin and niceness as the trainer) that trains with `train_step` on batches from a
torch DataLoader with as many worker processes as the platform's data side gets (the cluster's
CPUs left after the trainer's reservation, at least 1), running `bench data`'s DataLoader stream:
the platform's own work items, decode and views (seeded 0, the platform's default seed). Nothing
else runs there: no reports, no checkpoints, no diagnostics.

Both sides train under the same time budget (train.time_budget_s, counted from the first batch,
start-up outside it) with the same schedule logic (`Pace`);
train.steps is set beyond what the budget allows, so the budget ends every run. Runs alternate,
platform first (a drift in machine load hits both sides); the ratio is platform steps over the
next bare run's steps. Workloads: `default`, the embedded default's settings; `paper`, its views
2 x 224 + 6 x 96 with a 4-block ViT (width 96, patch 16) and batch 64 on synthetic 256 px JPEG
shards (`bench data`'s generator).

CPU time: every process under each side's process is sampled (psutil) every SAMPLE_S seconds
(utime + stime), named by the first task or actor title it shows (Ray titles a worker by what it
runs, IDLE in between) and charged to a group: platform: trainer (the Ray Train worker, which
also runs its rank's Ray Data executor), data_tasks (processes running the view tasks,
Ray Data tasks named after `pipeline.VIEW_OPERATOR`), ray (raylet, GCS, dashboard and agents, workers that never ran a task,
Ray Train's coordinating actors, the job's small actors) and driver; bare: trainer (the loop's
process) and data_tasks (DataLoader workers). Shares are over the training window (platform: located by the Train controller's
report times, a callback), interpolated between samples. A process that ends between two samples
loses at most one interval of CPU time, the tail after its last sample; each run says how many
processes ended within the window, and for the whole run compares what was sampled with what the
kernel accounted to the side's process once it and the descendants it waited for had ended
(`reaped_cpu_s`). On the bare side the two agree; on the platform side Ray's processes are mostly
not waited for by their parents at shutdown, so there it is a lower bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from ray.train import UserCallback

from lejepa_platform.bench.data import process_tree, synthetic_jpegs
from lejepa_platform.config import RunConfig, augment_placement, to_dict
from lejepa_platform.console import say
from lejepa_platform.overrides import from_dict, set_values
from lejepa_platform.data.pipeline import VIEW_OPERATOR
from lejepa_platform.defaults import default_run_config
from lejepa_platform.errors import UserError
from lejepa_platform.ray_env import JOB_ENV_VARS, job_env_vars

WORKLOADS = ("default", "paper")
DEFAULT_REPEATS = 3
QUICK_SECONDS = 8.0
SAMPLE_S = 1.0
"""Seconds between CPU samples of a side's process tree (each sample reads every process's
counters: the bench reports what its sampling cost as sampler_cpu_s)."""
STEPS_PER_S_CAP = 50
"""train.steps is at least the budget times this: far more steps than these models take per second on CPU."""
GOAL = 0.9
"""Median platform / bare ratio of training steps wanted."""
IDLE_NAMES = ("IDLE", "setup_worker.py", "default_worker.py")
"""Titles of a Ray worker process that has not run a task or actor yet (starting, or waiting)."""


# --------------------------------------------------------------------------------------------
# Workloads.


def workload_config(name: str, seconds: float, shards: str = "") -> RunConfig:
    """The run both sides train: the embedded default (or the paper's views with a small ViT on
    `shards`), eval off, with a time budget of `seconds` that ends the run before train.steps."""
    cfg = default_run_config()
    if name == "paper":
        cfg = set_values(cfg, {
            "model.backbone_kwargs": {"img_size": 224, "patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 3},
            "data.source": shards, "data.global_views": 2, "data.global_size": 224, "data.local_views": 6,
            "data.local_size": 96, "data.batch_size": 64, "data.shuffle_buffer": 256})
    return set_values(cfg, {"eval.enabled": False, "train.time_budget_s": float(seconds),
                            "train.steps": max(cfg.train.steps, math.ceil(seconds * STEPS_PER_S_CAP))})


def _views(cfg: RunConfig) -> str:
    d = cfg.data
    local = f" + {d.local_views} x {d.local_size}" if d.local_views else ""
    return f"{d.global_views} x {d.global_size}{local}"


# --------------------------------------------------------------------------------------------
# CPU time of a process tree.


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    """One process at one sample: its name (from its title) and CPU seconds used so far."""

    pid: int
    name: str
    cpu_s: float


Snapshot = dict[tuple[int, float], ProcessSample]
"""Processes of a tree at one instant, keyed by (pid, start time): a reused pid is a new process."""


def process_name(title: str) -> str:
    """A short name from a process's command line: the task or actor of a Ray worker
    ("ray::SplitCoordinator.get" -> "SplitCoordinator"), a script's file name, else the program."""
    if title.startswith("ray::"):
        name = (title[len("ray::"):].split() or ["?"])[0]
        return name if "(" in name else name.split(".")[0]
    words = title.split()
    if not words:
        return "?"
    if words[0].startswith("ray-"):  # dashboard modules title themselves
        return words[0]
    script = next((w for w in words[1:] if w.endswith(".py")), None)
    if script:
        return Path(script).name
    if "-m" in words[1:-1]:
        return words[words.index("-m") + 1]
    if "-c" in words:
        return "python -c"
    return Path(words[0]).name


def _read_process(pid: int) -> tuple[tuple[int, float], ProcessSample, int] | None:
    """((pid, start time), sample, niceness); None if it has gone."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            title = " ".join(process.cmdline())
            times = process.cpu_times()
            key = (pid, process.create_time())
            niceness = process.nice()
    except psutil.Error:
        return None
    return key, ProcessSample(pid, process_name(title), times.user + times.system), niceness


def process_settings(pid: int, niceness: int) -> dict[str, Any]:
    """A process's niceness and its values of the job's environment variables."""
    try:
        env = psutil.Process(pid).environ()
    except psutil.Error:
        env = {}
    return {"niceness": niceness, **{key: env.get(key) for key in JOB_ENV_VARS}}


class CpuSampler(threading.Thread):
    """Snapshots of the process tree under `root` every SAMPLE_S seconds until `finish`; the
    settings of the first process `watch(pid, name)` picks (its trainer) are read once."""

    def __init__(self, root: int, watch: Callable[[int, str], bool]) -> None:
        super().__init__(daemon=True)
        self.root, self.watch = root, watch
        self.samples: list[tuple[float, Snapshot]] = []
        self.settings: dict[str, Any] | None = None
        self.cpu_s = 0.0
        self._halt = threading.Event()

    def snapshot(self) -> None:
        now, procs = time.time(), {}
        for pid in process_tree(self.root):
            read = _read_process(pid)
            if read is None:
                continue
            key, sample, niceness = read
            procs[key] = sample
            if self.settings is None and self.watch(pid, sample.name):
                self.settings = process_settings(pid, niceness)
        self.samples.append((now, procs))

    def run(self) -> None:
        while not self._halt.is_set():
            self.snapshot()
            self._halt.wait(SAMPLE_S)
        self.cpu_s = time.thread_time()

    def finish(self) -> list[tuple[float, Snapshot]]:
        self._halt.set()
        self.join()
        return self.samples


@dataclasses.dataclass
class Charged:
    """CPU seconds charged to each (group, name) up to each sample time, and who was alive when."""

    times: np.ndarray
    cumulative: dict[tuple[str, str], np.ndarray]
    data_processes: np.ndarray
    """Processes in group data_tasks at each sample."""
    last_seen: dict[tuple[int, int], float]

    def total(self) -> dict[tuple[str, str], float]:
        """CPU seconds of each (group, name) over all samples."""
        return {key: float(cum[-1]) for key, cum in self.cumulative.items()}

    def between(self, start: float, end: float) -> dict[tuple[str, str], float]:
        """CPU seconds of each (group, name) in [start, end], linear between samples."""
        return {key: float(np.interp(end, self.times, cum) - np.interp(start, self.times, cum))
                for key, cum in self.cumulative.items()}

    def ended_between(self, start: float, end: float) -> int:
        """Processes whose last sample lies in [start, end) but before the last sample of all."""
        final = self.times[-1]
        return sum(1 for seen in self.last_seen.values() if start <= seen < min(end, final))


def charge(samples: list[tuple[float, Snapshot]], group: Callable[[int, str], str]) -> Charged:
    """Charge each process's CPU time between two samples to its group and name: the first task or
    actor title it ever shows (a Ray worker is titled IDLE between the short tasks it runs, but the
    work between samples is theirs), its first title for a worker that never runs one. A process first
    seen at a sample spent all its CPU time since the previous one, when it was not there yet."""
    times = np.array([t for t, _ in samples])
    names: dict[tuple[int, int], str] = {}
    for _, procs in samples:
        for key, now in procs.items():
            if key not in names or (names[key] in IDLE_NAMES and now.name not in IDLE_NAMES):
                names[key] = now.name
    spent: dict[tuple[str, str], np.ndarray] = {}
    known: dict[tuple[int, int], ProcessSample] = {}
    last_seen: dict[tuple[int, int], float] = {}
    data = np.zeros(len(samples), dtype=int)
    for i, (t, procs) in enumerate(samples):
        for key, now in procs.items():
            before = known.get(key)
            which = group(now.pid, names[key])
            cpu_s = now.cpu_s - (before.cpu_s if before else 0.0)
            spent.setdefault((which, names[key]), np.zeros(len(samples)))[i] += cpu_s
            data[i] += which == "data_tasks"
            known[key], last_seen[key] = now, t
    return Charged(times, {k: np.cumsum(v) for k, v in spent.items()}, data, last_seen)


def platform_group(root: int) -> Callable[[int, str], str]:
    def group(pid: int, name: str) -> str:
        if pid == root:
            return "driver"
        if name.startswith("RayTrainWorker"):
            return "trainer"
        if VIEW_OPERATOR in name:
            return "data_tasks"
        return "ray"
    return group


def bare_group(root: int) -> Callable[[int, str], str]:
    return lambda pid, name: "trainer" if pid == root else "data_tasks"


def _by_group(cpu: dict[tuple[str, str], float], groups: tuple[str, ...]) -> dict[str, float]:
    return {g: sum(v for (which, _), v in cpu.items() if which == g) for g in groups}


def _shares(cpu_s: dict[str, float]) -> dict[str, float]:
    total = sum(cpu_s.values())
    return {k: round(v / total, 4) if total > 0 else 0.0 for k, v in cpu_s.items()}


# --------------------------------------------------------------------------------------------
# The two sides, each in its own process.


class ReportTimes(UserCallback):
    """Appends [wall time, train/seconds] of each report, as the Train controller receives it, to a
    file: the benchmark locates the platform's training window from it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and "train/seconds" in metrics[0]:
            with open(self.path, "a") as out:
                out.write(json.dumps([time.time(), metrics[0]["train/seconds"]]) + "\n")


def _platform_main() -> None:
    """Entry point of a platform run's process: a JSON request on stdin, a JSON result on stdout."""
    import ray

    from lejepa_platform.run.launch import pretrain

    request = json.loads(sys.stdin.read())
    cfg = from_dict(RunConfig, request["run"])
    summary = pretrain(cfg, quiet=True, callbacks=(ReportTimes(request["reports"]),))
    reports = [json.loads(line) for line in Path(request["reports"]).read_text().splitlines()]
    start = min(t - seconds for t, seconds in reports)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    print(json.dumps({"steps": summary["steps"], "train_seconds": reports[-1][1], "stopped_by": summary["stopped_by"],
                      "window": [start, start + reports[-1][1]], "backbone_params": summary["backbone_params"],
                      "data_processes": max(1, math.floor(cpus - cfg.train.workers * cfg.train.cpus_per_worker))}))


def bare_loop(cfg: RunConfig, data_processes: int) -> dict[str, Any]:
    """Train with `train_step` on DataLoader batches until the time budget ends (see the module docstring)."""
    from lejepa_platform.bench.data import loader_batches
    from lejepa_platform.train.checkpoint import backbone_state
    from lejepa_platform.run.launch import epochs_needed, preflight
    from lejepa_platform.train.bookkeeping import Pace, StopRequests
    from lejepa_platform.train.step import Pretrainer, make_optimizer, train_step

    facts = preflight(cfg)
    device = torch.device("cpu")
    torch.set_num_threads(cfg.train.torch_threads or math.ceil(cfg.train.cpus_per_worker))
    torch.manual_seed(cfg.train.seed)
    model = Pretrainer(cfg, facts.num_classes, device=device)
    optimizer = make_optimizer(model, cfg)
    pace = Pace(cfg, trained_before_s=0.0, stop=StopRequests(None, rank=0), world=1, device=device)
    batches = loader_batches(cfg.data, epochs_needed(cfg, facts.plan), cfg.data.batch_size, data_processes, {},
                              photometric=augment_placement(cfg) == "data")
    step, finished, start, shapes = 0, False, 0.0, {}
    for batch in batches:
        plan = pace.plan(step)
        if step == 0:
            start = time.time() - pace.seconds()
            shapes = {k: list(batch[k].shape) for k in ("global", "local") if k in batch}
        train_step(model, optimizer, batch, cfg=cfg, step=step, device=device, position=plan.position)
        step, finished = step + 1, plan.last
        if finished:
            break
    seconds = pace.seconds()
    batches.close()  # stops and reaps the DataLoader's workers (their CPU time then counts in ours)
    stopped_by = "data" if not finished else "steps" if step >= cfg.train.steps else "time budget"
    return {"steps": step, "train_seconds": seconds, "stopped_by": stopped_by, "window": [start, start + seconds],
            "backbone_params": sum(v.numel() for v in backbone_state(model.state_dict()).values()),
            "batch_shapes": shapes, "data_processes": data_processes}


def _bare_main() -> None:
    """Entry point of a bare run's process: a JSON request on stdin, a JSON result on stdout."""
    request = json.loads(sys.stdin.read())
    result = bare_loop(from_dict(RunConfig, request["run"]), request["data_processes"])
    print(json.dumps(result))


SIDES = {
    "platform": ("_platform_main", platform_group, lambda pid, name: name.startswith("RayTrainWorker"),
                 ("trainer", "data_tasks", "ray", "driver")),
    "bare": ("_bare_main", bare_group, lambda pid, name: True, ("trainer", "data_tasks")),
}


def _run_side(side: str, cfg: RunConfig, tmp: Path, run_index: int, data_processes: int) -> tuple[dict, dict]:
    """One run of `side` in a fresh process, sampled: (its JSON-ready record, its trainer's settings)."""
    entry, grouping, watch, groups = SIDES[side]
    if side == "platform":
        cfg = set_values(cfg, {"train.storage_path": str(tmp / "runs"), "track.uri": f"sqlite:///{tmp / 'mlflow.db'}"})
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local cluster
        env["RAY_USAGE_STATS_ENABLED"] = "0"
    else:
        env = {**os.environ, **job_env_vars()}
    request = {"run": to_dict(cfg), "data_processes": data_processes, "reports": str(tmp / f"reports-{run_index}.jsonl")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", f"from lejepa_platform.bench.e2e import {entry}; {entry}()"],
                                 stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, env=env, cwd=tmp)
        sampler = CpuSampler(child.pid, watch)
        sampler.start()
        child.stdin.write(json.dumps(request))
        child.stdin.close()
        code = child.wait()
        samples = sampler.finish()
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"bench e2e: the {side} run failed (exit {code}):\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    wall = time.perf_counter() - launched
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    charged = charge(samples, grouping(child.pid))
    start, end = result.pop("window")
    inside = (charged.times >= start) & (charged.times <= end)
    window = charged.between(start, end)
    training = _by_group(window, groups)
    whole = _by_group(charged.total(), groups)
    batch = cfg.data.batch_size
    record = {
        "side": side, **result, "train_seconds": round(result["train_seconds"], 3),
        "images_per_s": round(result["steps"] * batch / result["train_seconds"], 2), "wall_s": round(wall, 1),
        "data_processes_seen": int(charged.data_processes[inside].max()) if inside.any() else 0,
        "training": {"cpu_s": {k: round(v, 2) for k, v in training.items()}, "cpu_shares": _shares(training),
                     "processes_ended": charged.ended_between(start, end)},
        "whole_run": {"cpu_s": {k: round(v, 2) for k, v in whole.items()}, "sampled_cpu_s": round(sum(whole.values()), 2),
                      "reaped_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)},
        "sampler_cpu_s": round(sampler.cpu_s, 2)}
    if side == "platform":
        total = sum(training.values())
        ray_names = sorted(((name, v) for (which, name), v in window.items() if which == "ray" and v > 0),
                           key=lambda kv: -kv[1])
        record["training"]["ray_detail_shares"] = {name: round(v / total, 4) for name, v in ray_names}
    return record, sampler.settings or {}


# --------------------------------------------------------------------------------------------
# The benchmark.


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "each": values}


def _side_summary(runs: list[dict]) -> dict[str, Any]:
    """Medians and spread over a side's runs; CPU shares of all its training windows pooled."""
    pooled: dict[str, float] = {}
    for run in runs:
        for k, v in run["training"]["cpu_s"].items():
            pooled[k] = pooled.get(k, 0.0) + v
    seconds = sum(run["train_seconds"] for run in runs)
    return {"steps": _spread([r["steps"] for r in runs]), "images_per_s": _spread([r["images_per_s"] for r in runs]),
            "cpu_shares": _shares(pooled), "cpu_cores": {k: round(v / seconds, 3) for k, v in pooled.items()}}


def run(quick: bool = False, *, seconds: float | None = None, repeats: int | None = None,
        workload: str | None = None) -> dict[str, Any]:
    """Alternating platform and bare runs of `workload`; JSON-ready (see the module docstring)."""
    from lejepa_platform.data.shards import build_shards

    workload = workload or "default"
    seconds = seconds if seconds is not None else QUICK_SECONDS if quick else default_run_config().train.time_budget_s
    repeats = repeats if repeats is not None else 1 if quick else DEFAULT_REPEATS
    if workload not in WORKLOADS:
        raise UserError(f"--workload {workload!r} is not allowed: use one of {', '.join(WORKLOADS)}")
    if not seconds > 0:
        raise UserError(f"--seconds {seconds:g} is not allowed: the training time must be > 0")
    if repeats < 1:
        raise UserError(f"--repeats {repeats} is not allowed: must be >= 1")
    load = os.getloadavg()[0]
    runs: list[dict] = []
    settings: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lejepa-bench-e2e-") as name:
        tmp = Path(name)
        shards = ""
        if workload == "paper":
            synthetic_jpegs(tmp / "jpegs", 256 if quick else 2048)
            shards = str(tmp / "shards")
            build_shards(str(tmp / "jpegs"), shards, rows_per_shard=256, test_fraction=0.1)
        cfg = workload_config(workload, seconds, shards)
        data_processes = 1
        for index, side in enumerate(["platform", "bare"] * repeats):
            say(False, f"bench e2e: {workload} run {index + 1}/{2 * repeats} ({side}, {seconds:g} s of training)")
            record, trainer = _run_side(side, cfg, tmp, index, data_processes)
            data_processes = record["data_processes"]  # the next bare run gets what this platform run's data got
            settings.setdefault(side, trainer)
            runs.append({"repeat": index // 2, **record})
            say(False, f"bench e2e: {side}: {record['steps']} steps in {record['train_seconds']:.1f} s")
    platform = [r for r in runs if r["side"] == "platform"]
    bare = [r for r in runs if r["side"] == "bare"]
    ratios = [round(p["steps"] / b["steps"], 3) for p, b in zip(platform, bare)]
    ratio = _spread(ratios)
    return {
        "bench": "e2e", "workload": workload, "quick": quick, "seconds": seconds, "repeats": repeats,
        "settings": {"backbone": cfg.model.backbone, "backbone_kwargs": cfg.model.backbone_kwargs,
                     "batch_size": cfg.data.batch_size, "views": _views(cfg), "train_steps_cap": cfg.train.steps,
                     "torch_threads": cfg.train.torch_threads, "cpus_per_worker": cfg.train.cpus_per_worker,
                     "data_processes": data_processes, "cpus": os.cpu_count()},
        "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
        "process_settings": {"platform_trainer": settings.get("platform", {}), "bare": settings.get("bare", {})},
        "runs": runs, "platform": _side_summary(platform), "bare": _side_summary(bare),
        "ratio_steps": ratio, "goal": f"median ratio_steps >= {GOAL}", "goal_met": ratio["median"] >= GOAL,
    }
