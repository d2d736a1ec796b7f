"""ONNX Runtime, ExecuTorch (XNNPACK) and Apache TVM (llvm, host) side by side on every built-in conv
task, fp32 and int8 (the static quantize stage's model; the same scales in every file): median latency
at batch 1 and 64 with 1 thread, timed round-robin in one loop, file bytes, argmax agreement with ONNX
Runtime on the held-out set, and the TensorRT-ready file's agreement (run by ONNX Runtime).

    python -m bench.runtimes [--tasks digits-lenet5 ...] [--repeats 30]
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # read when TVM's runtime starts its thread pool

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._table import print_table  # noqa: E402
from edgecompress.context import Context  # noqa: E402
from edgecompress.export import pte, tvm  # noqa: E402
from edgecompress.export.onnx import export_onnx, session  # noqa: E402
from edgecompress.export.tensorrt import export_tensorrt  # noqa: E402
from edgecompress.techniques import TECHNIQUES  # noqa: E402
from edgecompress.techniques.quantize import QuantizeSpec  # noqa: E402
from edgecompress.zoo import builtin_task  # noqa: E402

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
        runs = {"onnxruntime": _ort(onnx_path), "tvm": tvm.runner(so)}
        et = {b: pte.runner(p) for b, p in ptes.items()}
        ref = np.concatenate([runs["onnxruntime"](xs[i:i + 64]) for i in range(0, len(xs), 64)])
        agree = {"onnxruntime": 1.0, "tvm": _agree(runs["tvm"](xs), ref),
                 "executorch": _agree(np.concatenate([et[1](xs[i:i + 1]) for i in range(len(xs))]), ref)}
        sizes = {"onnxruntime": onnx_path.stat().st_size, "tvm": so.stat().st_size,
                 "executorch": ptes[1].stat().st_size}
        lat = {}
        for b in BATCHES:
            x = np.ascontiguousarray(np.resize(xs, (b, *xs.shape[1:])), dtype=np.float32)
            fns = {"onnxruntime": runs["onnxruntime"], "tvm": runs["tvm"], "executorch": et[b]}
            times = {k: [] for k in fns}
            for k, f in fns.items():  # warm-up
                for _ in range(3):
                    f(x)
            for _ in range(repeats):  # round-robin: every runtime sees the same machine state
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t0)
            for k in fns:
                lat[k, b] = statistics.median(times[k]) * 1e3
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
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(1)  # XNNPACK's thread pool: 1 thread like the others
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            rows += bench_task(name, args.repeats, Path(tmp))
    print_table(["task", "model", "runtime", "ms b=1", "ms b=64", "file bytes", "agree (ORT)", "TensorRT-ready agree"],
                rows)


if __name__ == "__main__":
    main()
