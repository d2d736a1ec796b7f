"""ONNX Runtime, ExecuTorch (XNNPACK) and Apache TVM (llvm, host) side by side on every built-in conv
task, fp32 and int8 (the static quantize stage's model; the same scales in every file): median latency
at batch 1 and 64 with 1 thread (XNNPACK's and TVM's thread pools set to 1), timed round-robin in one
loop by ``measure.compare_latency`` on a seeded random batch, file bytes, argmax agreement with ONNX
Runtime on the held-out set, and the TensorRT-ready file's agreement (run by ONNX Runtime).

    python -m bench.runtimes [--tasks digits-lenet5 ...] [--repeats 30]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgecompress.context import Context
from edgecompress.export import pte, tvm
from edgecompress.export.onnx import export_onnx, session
from edgecompress.export.tensorrt import export_tensorrt
from edgecompress.measure import compare_latency
from edgecompress.techniques import TECHNIQUES
from edgecompress.techniques.quantize import QuantizeSpec
from edgecompress.zoo import builtin_task

from ._table import print_table

TASKS = ["digits-lenet5", "mnist1d-cnn", "digits-resnet8", "digits-mobilenet"]
BATCHES = (1, 64)


def _ort(path):
    s = session(path, threads=1)
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})[0]


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def bench_task(name: str, repeats: int, tmp: Path) -> list[list[str]]:
    t = builtin_task(name)
    q = TECHNIQUES["quantize"][1](copy.deepcopy(t.model), QuantizeSpec(stage="quantize", mode="static"),
                                  Context(task=t, seed=0, where="stages[0]")).eval()
    xs = torch.cat([x for x, _ in t.eval_data]).numpy()
    rows = []
    for tag, model in (("fp32", t.model), ("int8", q)):
        onnx_path = export_onnx(model, t.example_input, tmp / f"{name}-{tag}.onnx")
        so = tvm.export_library(onnx_path, tmp / f"{name}-{tag}.so")
        ptes = {b: pte.export_pte(model, t.example_input, tmp / f"{name}-{tag}-b{b}.pte", int8=tag == "int8", batch=b)
                for b in BATCHES}
        runs = {"onnxruntime": _ort(onnx_path), "tvm": tvm.runner(so, threads=1)}
        et = {b: pte.runner(p, threads=1) for b, p in ptes.items()}
        ref = np.concatenate([runs["onnxruntime"](xs[i:i + 64]) for i in range(0, len(xs), 64)])
        agree = {"onnxruntime": 1.0, "tvm": _agree(runs["tvm"](xs), ref),
                 "executorch": _agree(np.concatenate([et[1](xs[i:i + 1]) for i in range(len(xs))]), ref)}
        sizes = {"onnxruntime": onnx_path.stat().st_size, "tvm": so.stat().st_size,
                 "executorch": ptes[1].stat().st_size}
        lat = {}
        for b in BATCHES:  # round-robin in one loop per batch size: every runtime sees the same machine state
            fns = {"onnxruntime": onnx_path, "tvm": runs["tvm"], "executorch": et[b]}
            for k, ms in zip(fns, compare_latency(list(fns.values()), t.example_input, (b,), 1, repeats, warmup=3,
                                                  budget_s=600)):
                lat[k, b] = ms[f"b{b}"]
        trt = ""
        if tag == "int8":
            trt_path = export_tensorrt(q, t.example_input, tmp / f"{name}-tensorrt.onnx")
            trt_out = np.concatenate([_ort(trt_path)(xs[i:i + 64]) for i in range(0, len(xs), 64)])
            trt = f"{_agree(trt_out, ref):.3f}"
        for k in ("onnxruntime", "executorch", "tvm"):
            rows.append([name, tag, k, f"{lat[k, 1]:.3f}", f"{lat[k, 64]:.3f}", f"{sizes[k]:,}", f"{agree[k]:.3f}",
                         trt if k == "onnxruntime" else ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            rows += bench_task(name, args.repeats, Path(tmp))
    print_table(["task", "model", "runtime", "ms b=1", "ms b=64", "file bytes", "agree (ORT)", "TensorRT-ready agree"],
                rows)


if __name__ == "__main__":
    main()
