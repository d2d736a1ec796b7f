"""How the benchmarks time what edgecompress's own ``measure.compare_latency`` cannot run (torch
models, CPU time): torch's threads fixed for a block, and medians of callables timed round-robin."""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch on ``n`` intra-op threads inside the block (None: as it is), as it was after it."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


def round_robin(fns: list[Callable[[], object]], repeats: int, warmup: int) -> list[tuple[float, float]]:
    """(median thread-CPU ms, median wall ms) of each callable: ``warmup`` calls of each first, then
    ``repeats`` rounds of one call of each, in one loop, so that every callable sees the same machine."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    cpu: list[list[float]] = [[] for _ in fns]
    wall: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, c, w in zip(fns, cpu, wall):
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            c.append((time.thread_time() - c0) * 1e3)
            w.append((time.perf_counter() - w0) * 1e3)
    return [(statistics.median(c), statistics.median(w)) for c, w in zip(cpu, wall)]
