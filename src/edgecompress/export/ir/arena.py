"""The activation arena: one buffer for every activation of a lowered graph, reusing the memory of
tensors whose lifetimes do not overlap."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph


ALIGN = 4


@dataclass
class ArenaPlan:
    offsets: dict[str, int]  # buffer (tensor) name -> byte offset in the arena
    buffer_of: dict[str, str]  # tensor -> the buffer it lives in (reshapes alias their input)
    sizes: dict[str, int]
    lifetimes: dict[str, tuple[int, int]]
    peak: int  # bytes of the arena
    total: int  # sum of all activation buffers (what a no-reuse layout needs)

    def peak_at(self, graph: Graph, elem_bytes: int = 1) -> str:
        """Which tensors are live at the step where the most activation bytes are live."""
        live = [sum(self.sizes[b] for b, (s, e) in self.lifetimes.items() if s <= step <= e)
                for step in range(len(graph.ops))]
        step = int(np.argmax(live))
        parts = [f"{b} {'x'.join(map(str, graph.tensors[b].shape))} ({self.sizes[b] * elem_bytes:,} B)"
                 for b, (s, e) in self.lifetimes.items() if s <= step <= e]
        return (f"while layer {graph.ops[step].layer} runs, {live[step] * elem_bytes:,} bytes are live: "
                + " + ".join(parts))


def plan_arena(graph: Graph, align: int = ALIGN) -> ArenaPlan:
    """Offsets of every activation in one arena, reusing memory of tensors whose lifetimes do not overlap.

    Lifetimes are [producing op, last consuming op] in execution order (the input is live from the
    start, the output to the end). Buffers are placed largest first at the lowest offset free for
    their whole lifetime (the greedy-by-size scheme TFLite Micro's planner also uses).
    """
    buffer_of = {graph.input: graph.input}
    for op in graph.ops:
        buffer_of[op.output] = buffer_of[op.inputs[0]] if op.kind == "reshape" else op.output
    first: dict[str, int] = {graph.input: -1}
    last: dict[str, int] = {}
    for step, op in enumerate(graph.ops):
        for i in op.inputs:
            last[buffer_of[i]] = step
        b = buffer_of[op.output]
        first.setdefault(b, step)
        last[b] = max(last.get(b, step), step)
    last[buffer_of[graph.output]] = len(graph.ops)
    sizes = {b: graph.tensors[b].size for b in first}
    life = {b: (first[b], last.get(b, first[b])) for b in first}
    order = sorted(first, key=lambda b: (-sizes[b], first[b]))
    offsets: dict[str, int] = {}
    for b in order:
        s0, e0 = life[b]
        busy = sorted((offsets[o], offsets[o] + sizes[o]) for o in offsets
                      if not (life[o][1] < s0 or e0 < life[o][0]))
        off = 0
        for lo, hi in busy:
            if off + sizes[b] <= lo:
                break
            off = max(off, -(-hi // align) * align)
        offsets[b] = off
    peak = max((offsets[b] + sizes[b] for b in offsets), default=0)
    peak = -(-peak // align) * align
    return ArenaPlan(offsets, buffer_of, sizes, life, peak, sum(sizes.values()))
