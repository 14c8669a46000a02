"""Run a function on N spawned CPU ranks (gloo on a free 127.0.0.1 port), for tests and benchmarks.

    results = run_on_cpu_ranks(work, world_size=2, args=(cases,))

Each child gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
(what torchrun would set), initialises the default gloo group, calls ``fn(*args)`` and sends
its return value back (serialised with ``torch.save``: tensors, numbers, strings, lists and
dicts). ``fn`` must be importable at module level (spawn pickles it by name). A failing rank
stops every rank and its traceback is raised in the parent.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: Sequence, results) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(*args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:     # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_cpu_ranks(fn: Callable, world_size: int, args: Sequence = (), *, timeout: float = 300.0,
                     threads_per_rank: int = 1) -> List[Any]:
    """Call ``fn(*args)`` on ``world_size`` spawned gloo ranks; return the values by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, threads_per_rank, fn, tuple(args), results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    values: List[Any] = [None] * world_size
    failed = True
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{world_size} CPU ranks did not finish within {timeout:.0f} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            values[rank] = torch.load(io.BytesIO(payload), weights_only=True)
        failed = False
    finally:
        for p in procs:
            p.join(timeout=0 if failed else 30)
        for p in procs:            # only the processes started above
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return values
