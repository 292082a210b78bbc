"""SIGReg benchmark: the project's chunked, recurrence-based SIGReg against the straightforward one.

`baseline_sigreg` below is the plain autograd version (it materialises the (N, M, K) angle, cos and
sin tensors and keeps them for backward); it is the reference the tests compare against.

What is measured, on CPU, for each (N, M) with D = 256, K = 17, one view, standard-Gaussian z:
- time: forward + backward of the scalar statistic in this process, median of several repeats
  after a warm-up, the two variants alternating run by run so that load from other processes
  hits both alike; torch thread count fixed (the caller's). `best_time_ratio` compares the fastest
  runs: on a machine shared with other work it is the steadier figure, because the project's
  version runs many small parallel ops and each can stall when cores are oversubscribed;
- peak memory: every variant and size runs in a FRESH subprocess; after imports, a tiny warm-up
  and building the inputs, the current RSS is read and the kernel's high-water mark is reset to it
  (Linux: write 5 to /proc/self/clear_refs), then one forward + backward runs and the high-water
  RSS (VmHWM) is read. The reported bytes are peak minus starting RSS: what the computation adds on
  top of its inputs, allocator slack included (resolution: pages and malloc arenas, ~1 MB). Where
  the reset is unsupported, the peak is ru_maxrss, which can include the warm-up's and, after a
  fork, the parent's peak: an upper bound (the summary's `peak_reset` says which);
- agreement: statistic and gradient wrt z of both variants on identical inputs; value error is
  |ours - base| / |base|, gradient error is max |g_ours - g_base| / max |g_base|.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from lejepa_platform.console import say
from lejepa_platform.distributed import all_reduce_mean, world_size
from lejepa_platform.loss.sigreg import quadrature, sigreg, slice_directions

DIM = 256
KNOTS = 17
TARGET = {"n": 1024, "m": 1024, "mem_ratio_max": 0.15, "time_ratio_max": 0.8, "rel_err_max": 1e-5}
"""The acceptance point: at N = M = 1024 the project's SIGReg must beat these bounds."""


def baseline_sigreg(z: torch.Tensor, directions: torch.Tensor, *, knots: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """Straightforward SIGReg (same definition as `loss.sigreg.sigreg`), plain autograd."""
    z3 = z if z.dim() == 3 else z.unsqueeze(0)
    dtype = torch.float64 if z3.dtype == torch.float64 else torch.float32
    x = z3.to(dtype) @ directions.to(dtype)  # (V, N, M)
    t, phi, w = quadrature(knots, t_max, dtype=dtype, device=x.device)
    angle = x.unsqueeze(-1) * t  # (V, N, M, K)
    c = all_reduce_mean(torch.cos(angle).mean(dim=1))
    s = all_reduce_mean(torch.sin(angle).mean(dim=1))
    err = (c - phi).square() + s.square()
    return ((err @ w).mean(dim=-1) * (x.shape[1] * world_size())).mean()


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {"ours": sigreg, "baseline": baseline_sigreg}


def run(quick: bool = False) -> dict[str, Any]:
    """Benchmark table (JSON-ready): one row per (N, M) and a summary at the acceptance point."""
    sizes = [(256, 256), (1024, 1024)] if quick else [(n, m) for n in (256, 1024, 4096) for m in (256, 1024)]
    repeats = 3 if quick else 7
    threads = torch.get_num_threads()
    rows, peak_reset = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for n, m in sizes:
            say(False, f"bench sigreg: N={n} M={m}")
            mem = {name: _in_subprocess(name, n, m, threads, os.path.join(tmp, f"{name}.pt")) for name in VARIANTS}
            peak_reset.update(r["peak_reset"] for r in mem.values())
            times = _interleaved_times(*_inputs(n, m), repeats)
            ours, base = mem["ours"], mem["baseline"]
            rows.append({
                "n": n, "m": m, "d": DIM, "knots": KNOTS,
                "time_s": statistics.median(times["ours"]), "baseline_time_s": statistics.median(times["baseline"]),
                "time_ratio": statistics.median(times["ours"]) / statistics.median(times["baseline"]),
                "best_time_ratio": min(times["ours"]) / min(times["baseline"]),
                "peak_mb": ours["peak_bytes"] / 2**20, "baseline_peak_mb": base["peak_bytes"] / 2**20,
                "mem_ratio": ours["peak_bytes"] / max(base["peak_bytes"], 1),
                "value": ours["value"], "value_rel_err": abs(ours["value"] - base["value"]) / abs(base["value"]),
                "grad_rel_err": float((ours["grad"] - base["grad"]).abs().max() / base["grad"].abs().max()),
            })
    return {"rows": rows, "summary": _summary(rows, threads, repeats, peak_reset == {True})}


def _summary(rows: list[dict[str, Any]], threads: int, repeats: int, peak_reset: bool) -> dict[str, Any]:
    at = next(r for r in rows if (r["n"], r["m"]) == (TARGET["n"], TARGET["m"]))
    checks = {
        "mem_ratio": at["mem_ratio"] <= TARGET["mem_ratio_max"],
        "time_ratio": at["time_ratio"] <= TARGET["time_ratio_max"],
        "value_rel_err": at["value_rel_err"] <= TARGET["rel_err_max"],
        "grad_rel_err": at["grad_rel_err"] <= TARGET["rel_err_max"],
    }
    return {
        "device": "cpu", "torch_threads": threads, "repeats": repeats, "peak_reset": peak_reset,
        "torch": torch.__version__,
        "target": TARGET,
        "at_target": {k: at[k] for k in ("time_ratio", "mem_ratio", "value_rel_err", "grad_rel_err")},
        "checks": checks, "meets_target": all(checks.values()),
        "worst_value_rel_err": max(r["value_rel_err"] for r in rows),
        "worst_grad_rel_err": max(r["grad_rel_err"] for r in rows),
        "memory": "peak RSS increase over the inputs, fresh subprocess per variant and size",
        "time": "median forward+backward seconds after a warm-up, variants alternating",
    }


def _inputs(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0))
    return z, slice_directions(DIM, m, seed=0, step=0)


def _step(variant: str, z: torch.Tensor, directions: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One forward + backward; the statistic and its gradient wrt z."""
    z = z.detach().requires_grad_(True)
    value = VARIANTS[variant](z, directions, knots=KNOTS)
    value.backward()
    return float(value.detach()), z.grad


def _interleaved_times(z: torch.Tensor, directions: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each variant, runs alternating so machine load hits both variants alike."""
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(repeats + 1):
        for name in VARIANTS:
            begin = time.perf_counter()
            _step(name, z, directions)
            if i:  # the first round is the warm-up
                times[name].append(time.perf_counter() - begin)
    return times


def _in_subprocess(variant: str, n: int, m: int, threads: int, grad_path: str) -> dict[str, Any]:
    """Value, gradient and peak bytes of one forward + backward in a fresh worker process."""
    spec = {"variant": variant, "n": n, "m": m, "threads": threads, "grad_path": grad_path}
    done = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sigreg bench worker failed ({variant}, N={n}, M={m}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["grad"] = torch.load(grad_path)
    return result


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant at one size in this fresh process: peak memory of one forward + backward."""
    torch.set_num_threads(spec["threads"])
    _step(spec["variant"], *_inputs(64, 64))  # load kernels and thread pools before measuring
    z, directions = _inputs(spec["n"], spec["m"])
    start_rss = _current_rss_bytes()
    exact = _reset_peak_rss()
    value, grad = _step(spec["variant"], z, directions)
    peak_bytes = max(0, _peak_rss_bytes() - start_rss)
    torch.save(grad, spec["grad_path"])
    return {"value": value, "peak_bytes": peak_bytes, "peak_reset": exact}


def _current_rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024 if _HAS_PROC else _peak_rss_bytes()


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """High-water RSS of this process. Without /proc, ru_maxrss (bytes on macOS, KiB elsewhere)."""
    if _HAS_PROC:
        return _proc_status_kib("VmHWM") * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


_HAS_PROC = os.path.exists("/proc/self/status")


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
