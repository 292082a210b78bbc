"""Run a function on several gloo ranks (CPU processes) and collect what each rank returns.

`run_in_gloo(world_size, fn, *args)` spawns one process per rank, initialises the default gloo
process group on 127.0.0.1 and a free port, calls `fn(rank, *args)` and returns the per-rank
return values in rank order. `fn` must be importable by name (a module-level function of a module on
sys.path) and its return value picklable. A rank that raises, exits or hangs fails the whole run
with that rank's traceback, and the other ranks are stopped.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_in_gloo(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """fn(rank, *args) on `world_size` gloo ranks; the list of their return values, by rank."""
    port = _free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{rank}.pt") for rank in range(world_size)]
        procs = [context.Process(target=_rank_main, args=(rank, world_size, port, paths[rank], fn, args))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        try:
            _wait(procs, timeout_s)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        outcomes = [torch.load(path, weights_only=False) if os.path.exists(path) else ("error", "no result")
                    for path in paths]
    failures = [f"rank {rank}: {detail}" for rank, (status, detail) in enumerate(outcomes) if status != "ok"]
    if failures:
        raise RuntimeError("gloo run failed:\n" + "\n".join(failures))
    return [value for _, value in outcomes]


def _wait(procs: list[Any], timeout_s: float) -> None:
    """Until all ranks exit; stop early when one fails (the others would block in a collective)."""
    deadline = time.monotonic() + timeout_s
    while any(proc.is_alive() for proc in procs):
        if any(proc.exitcode not in (None, 0) for proc in procs):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gloo ranks still running after {timeout_s} s")
        time.sleep(0.05)


def _rank_main(rank: int, world_size: int, port: int, path: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(("ok", fn(rank, *args)), path)
    except BaseException:
        torch.save(("error", traceback.format_exc()), path)
        raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
