"""Quantization benchmark: edgecompress against onnxruntime.quantization and torch's own, one run.

    python -m bench.quantize [--tasks digits-lenet300,digits-lenet5,mnist1d-cnn,digits-resnet8,...] [--repeats 30]

For each task, every model is an ONNX file run by ONNX Runtime (1 thread); accuracy (cosine and
top-1 retrieval agreement for minilm-embed) is computed from ONNX Runtime's outputs on the held-out
split, bytes are the file's, latency is the median after warm-up, all files of a task timed
round-robin in one loop (batch 64; batch 8 x 128 tokens for minilm-embed). Peers get the same
calibration batches. torch's own dynamic quantization (torch.ao) runs in torch, so its latency is
torch's and labelled so. Integer kernels are read from ONNX Runtime's optimized graph.
"""
from __future__ import annotations

import argparse
import copy
import io
import tempfile
import time
import warnings
from pathlib import Path

import torch

from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.measure import compare_latency
from edgecompress.zoo import load_task, minilm

from ._peers import ort_dynamic, ort_int4, ort_static, torch_dynamic
from ._quantize import kernels, ours, score
from ._table import print_table
from ._timing import round_robin

DIGITS = ("digits-lenet300", "digits-lenet5", "mnist1d-cnn", "digits-resnet8", "digits-mobilenet")
RECURRENT = ("digits-lstm", "digits-gru")  # the quantize stage takes LSTM / GRU in mode dynamic


def bench_task(name: str, tmp: Path, repeats: int) -> list[list[str]]:
    task = minilm.task(n_calib=32, n_eval=48) if name == minilm.NAME else load_task(name)
    batch = 8 if name == minilm.NAME else 64
    xs = torch.cat([x for x, _ in task.eval_data])
    fp32 = export_onnx(task.model, task.example_input, tmp / f"{name}-fp32.onnx")
    rows: list[tuple[str, Path, str]] = [("fp32", fp32, "")]

    def ec(label, **kw):
        model, secs, ctx = ours(task, **kw)
        path = export_onnx(model, task.example_input, tmp / f"{name}-{label.replace(' ', '_')}.onnx")
        extra = next((n for n in ctx.log.notes if n.startswith("bits: auto chose")), "")
        rows.append((f"edgecompress {label}", path, f"{secs:.0f}s {extra[:60]}"))

    def peer(label, fn, *args):
        path = tmp / f"{name}-{label.replace(' ', '_')}.onnx"
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(fp32, path, *args)
        except Exception as e:  # a peer that cannot handle the model is a result, not a crash
            rows.append((label, None, f"failed: {str(e).splitlines()[0][:70]}"))
            return
        rows.append((label, path, f"{time.perf_counter() - t0:.0f}s"))

    if name == minilm.NAME:
        ec("dynamic int8", mode="dynamic")
        peer("ort quantize_dynamic", ort_dynamic)
        ec("static W8A8", mode="static", calib_batches=4)
        ec("int4 g32 weight-only", mode="weight_only", bits=4, granularity="group", group_size=32)
        ec("int4 g32 GPTQ", mode="weight_only", bits=4, granularity="group", group_size=32, rounding="gptq")
        ec("int4 g32 GPTQ+MSE", mode="weight_only", bits=4, granularity="group", group_size=32, rounding="gptq",
           observer="mse")
        peer("ort MatMulNBits int4 g32", ort_int4)
    elif name in RECURRENT:
        ec("dynamic int8", mode="dynamic")
        ec("dynamic int8 per-tensor", mode="dynamic", granularity="tensor")
        peer("ort quantize_dynamic", ort_dynamic)
    else:
        ec("static W8A8", mode="static", calib_batches=8)
        peer("ort quantize_static", ort_static, task, 8)
        ec("dynamic int8", mode="dynamic")
        peer("ort quantize_dynamic", ort_dynamic)
        if name == "mnist1d-cnn":
            ec("QAT W4A8 LSQ", mode="qat", bits=4, lsq=True, finetune={"epochs": 3, "lr": 5e-4})
            ec("mixed <=5 bits +bias corr.", mode="static", bits="auto", budget_bits=5.0, bias_correction=True)
            ec("uniform W5A8 +bias corr.", mode="static", bits=5, bias_correction=True)
    ok = [(label, path, note) for label, path, note in rows if path is not None]
    lat = compare_latency([p for _, p, _ in ok], task.example_input, (batch,), repeats=repeats)
    base_ms = lat[0][f"b{batch}"]
    table = []
    for (label, path, note), ms in zip(ok, lat):
        out = run(session(path), xs, batch_size=16 if name == minilm.NAME else 256)
        m = ms[f"b{batch}"]
        table.append([name, label, score(task, out), f"{path.stat().st_size:,}", f"{m:.3f}",
                      f"{base_ms / m:.2f}x", kernels(path), note])
    for label, path, note in rows:
        if path is None:
            table.append([name, label, "-", "-", "-", "-", "-", note])
    if name != minilm.NAME:
        table.append(_torch_static(task, batch))
        table.append(_torch_dynamic(task, batch))
    return table


def _torch_dynamic(task, batch: int) -> list[str]:
    """torch.ao.quantization.quantize_dynamic (Linear, LSTM, GRU; int8): accuracy, bytes of its state_dict, and
    latency in torch (it has no ONNX export)."""
    name = task.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch_dynamic(task.model)
            buf = io.BytesIO()
            torch.save(q.state_dict(), buf)
            xs = torch.cat([x for x, _ in task.eval_data])
            with torch.no_grad():
                out = q(xs)
                x = xs[:batch]
                [(_, ms)] = round_robin([lambda: q(x)], 30, warmup=0)
        return [name, "torch.ao quantize_dynamic", score(task, out), f"{buf.tell():,} (torch.save)",
                f"{ms:.3f} (torch)", "-", "torch fbgemm", ""]
    except Exception as e:
        return [name, "torch.ao quantize_dynamic", "-", "-", "-", "-", "-", f"failed: {str(e)[:60]}"]


def _torch_static(task, batch: int) -> list[str]:
    """torch.ao FX graph-mode static int8 (x86 backend), calibrated on the same batches: accuracy, bytes
    of its state_dict, and latency in torch (its quantized ops have no ONNX export)."""
    name = task.name
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = copy.deepcopy(task.model).eval()
            p = prepare_fx(m, get_default_qconfig_mapping("x86"), (task.example_input,))
            with torch.no_grad():
                for i, (x, _) in enumerate(task.calib_data):
                    if i >= 8:
                        break
                    p(x)
            q = convert_fx(p)
            buf = io.BytesIO()
            torch.save(q.state_dict(), buf)
            xs = torch.cat([x for x, _ in task.eval_data])
            with torch.no_grad():
                out = q(xs)
                (_, f32), (_, i8) = round_robin([lambda: task.model(xs[:batch]), lambda: q(xs[:batch])], 30,
                                                warmup=0)  # float and int8 alternately, same loop
        return [name, "torch.ao static FX (x86)", score(task, out), f"{buf.tell():,} (torch.save)",
                f"{i8:.3f} (torch)", f"{f32 / i8:.2f}x vs torch fp32", "torch fbgemm/onednn", ""]
    except Exception as e:
        return [name, "torch.ao static FX (x86)", "-", "-", "-", "-", "-", f"failed: {str(e).splitlines()[0][:60]}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(DIGITS + RECURRENT + (minilm.NAME,)))
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    head = ["task", "method", "accuracy", "bytes", "ms", "speed-up", "ORT integer kernels", "notes"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks.split(","):
            if name == minilm.NAME and not minilm.available():
                rows.append([name, "skipped", "-", "-", "-", "-", "-", "transformers extra not installed"])
                continue
            rows.extend(bench_task(name, Path(tmp), args.repeats))
    print_table(head, rows)
    print("\nms: ONNX Runtime, 1 thread, median; batch 64 (digits, MNIST-1D) or batch 8 x 128 tokens "
          "(minilm-embed). Speed-up against the fp32 row of the same task, same loop.")


if __name__ == "__main__":
    main()
