"""Recurrent nets, dynamic int8: edgecompress against onnxruntime.quantization.quantize_dynamic and
torch.ao quantize_dynamic, on digits-lstm and digits-gru, one run.

    python -m bench.quantize_rnn [--tasks digits-lstm,digits-gru] [--repeats 200]

Every ONNX model runs in ONNX Runtime with one intra-op thread, which computes in the calling thread;
each run is timed twice, by the wall clock and by that thread's CPU time (``time.thread_time``). On a
machine shared with other jobs the wall clock also counts the time the thread waits for a core, so
the CPU-time median is the steadier figure; both are printed. Models are timed round-robin in one
loop, batch 64. torch.ao runs in torch (one thread), timed the same way. Accuracy comes from each
runtime's own outputs on the held-out split.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.zoo import load_task

from ._peers import ort_dynamic, torch_dynamic
from ._quantize import kernels, ours, score
from ._table import print_table
from ._timing import round_robin

TASKS = ("digits-lstm", "digits-gru")


def bench_task(name: str, tmp: Path, repeats: int) -> list[list[str]]:
    task = load_task(name)
    xs = torch.cat([x for x, _ in task.eval_data])
    x64 = torch.rand((64, *task.example_input.shape[1:]), generator=torch.Generator().manual_seed(0))
    fp32 = export_onnx(task.model, task.example_input, tmp / f"{name}-fp32.onnx")
    rows: list[tuple[str, Path]] = [("fp32", fp32)]
    for label, kw in (("edgecompress dynamic int8", {}), ("edgecompress dynamic int8 per-tensor",
                                                           {"granularity": "tensor"})):
        model, _, _ = ours(task, mode="dynamic", **kw)
        rows.append((label, export_onnx(model, task.example_input, tmp / f"{name}-{len(rows)}.onnx")))
    ort_path = tmp / f"{name}-ort.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_dynamic(fp32, ort_path)
    rows.append(("ort quantize_dynamic", ort_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq = torch_dynamic(task.model)
    buf = io.BytesIO()
    torch.save(tq.state_dict(), buf)
    sessions = [session(p) for _, p in rows]
    feed = x64.numpy().astype(np.float32)

    def ort_fn(s):
        return lambda: s.run(None, {s.get_inputs()[0].name: feed})

    def torch_fn():
        with torch.no_grad():
            tq(x64)

    times = round_robin([ort_fn(s) for s in sessions] + [torch_fn], repeats, warmup=10)
    base_cpu = times[0][0]
    table = []
    for (label, path), s, (c, w) in zip(rows, sessions, times):
        out = run(s, xs)
        table.append([name, label, score(task, out), f"{path.stat().st_size:,}", f"{c:.3f}", f"{w:.3f}",
                      f"{base_cpu / c:.2f}x", kernels(path)])
    with torch.no_grad():
        out = tq(xs)
    c, w = times[-1]
    table.append([name, "torch.ao quantize_dynamic", score(task, out), f"{buf.tell():,} (torch.save)",
                  f"{c:.3f} (torch)", f"{w:.3f} (torch)", f"{base_cpu / c:.2f}x", "torch fbgemm"])
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    head = ["task", "method", "accuracy", "bytes", "cpu ms", "wall ms", "speed-up (cpu)", "ORT integer kernels"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks.split(","):
            rows.extend(bench_task(name, Path(tmp), args.repeats))
    print_table(head, rows)
    print(f"\nbatch 64, one thread, medians of {args.repeats} round-robin runs; cpu ms is the running thread's CPU "
          "time, wall ms the wall clock. Speed-up: fp32 cpu ms / this row's cpu ms.")


if __name__ == "__main__":
    main()
