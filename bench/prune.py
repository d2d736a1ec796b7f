"""Pruning benchmark: edgecompress against torch.nn.utils.prune and its own variants, one run.

    python -m bench.prune [--epochs 10] [--lr 2e-3] [--seeds 3] [--quick]

Tables, all from this run, every model fine-tuned with the same budget (``--epochs`` of Adam,
lr ``--lr``, cosine, the task's training split):

1. unstructured at 90/95/98% on digits-lenet300, digits-lenet5 and mnist1d-cnn: torch.nn.utils.prune
   global L1 (masks held by its forward hooks during fine-tune) vs edgecompress global magnitude
   one-shot and gradual (Zhu & Gupta ramp during the same fine-tune): test accuracy, nonzeros, ONNX
   bytes and zstd-compressed ONNX bytes (dense kernels: no speed-up is claimed for zeros);
2. mnist1d-cnn 50-95%: mean test accuracy over ``--seeds`` fine-tune seeds, torch prune vs
   edgecompress gradual;
3. structured channels (Torch-Pruning dependency graph through the recipe): params, MACs (ONNX
   graph), ONNX bytes and ONNX Runtime latency at batch 64 (1 thread, median, round-robin);
4. sensitivity-based allocation vs uniform at equal MACs;
5. N:M 2:4: accuracy, and ONNX Runtime latency against dense (no 2:4 kernel runs here).

The benchmark pins torch to one intra-op thread so timings on a shared machine are repeatable.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import zstandard
from torch import nn

from edgecompress.context import Context
from edgecompress.export.onnx import export_onnx
from edgecompress.measure import compare_latency, measure
from edgecompress.spec import FineTune
from edgecompress.task import evaluate
from edgecompress.techniques import prune
from edgecompress.zoo import builtin_task

from ._peers import torch_global_l1
from ._table import markdown


def nonzeros(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def onnx_bytes(model: nn.Module, task, out: Path) -> tuple[int, int]:
    path = export_onnx(model, task.example_input, out)
    raw = path.read_bytes()
    return len(raw), len(zstandard.ZstdCompressor(level=19).compress(raw))


def ours(task, spec: dict, ft: FineTune | None, seed: int, workdir: Path | None = None) -> tuple[nn.Module, Context]:
    spec = prune.PruneSpec(**spec, finetune=ft.model_dump() if ft else None)
    ctx = Context(task=task, seed=seed, where="stages[0]", workdir=workdir)
    model = prune.apply(task.fresh_model(), spec, ctx)
    if spec.finetune is not None and not ctx.finetuned:
        ctx.finetune(model, spec.finetune)
    return model.eval(), ctx


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def unstructured(tasks: list[str], sparsities: list[float], ft: FineTune, tmp: Path) -> str:
    rows = []
    for name in tasks:
        task = builtin_task(name)
        base = evaluate(task.model, task)
        b, bz = onnx_bytes(task.model, task, tmp / "b.onnx")
        rows.append([name, "baseline", "-", pct(base), "-", f"{nonzeros(task.model):,}", f"{b:,}", f"{bz:,}"])
        for s in sparsities:
            variants = {
                "torch.nn.utils.prune global L1": lambda: torch_global_l1(task, s, ft, 0),
                "edgecompress magnitude one-shot": lambda: ours(task, {"sparsity": s}, ft, 0)[0],
                "edgecompress magnitude gradual": lambda: ours(task, {"sparsity": s, "schedule": "gradual"}, ft, 0)[0],
            }
            if name == "mnist1d-cnn":  # one-shot is torch's algorithm; table 2 has mnist1d-cnn over seeds
                del variants["edgecompress magnitude one-shot"]
            for label, run in variants.items():
                m = run()
                acc = evaluate(m, task)
                nb, nz = onnx_bytes(m, task, tmp / "m.onnx")
                rows.append([name, label, f"{s:.0%}", pct(acc), f"{100 * (acc - base):+.2f}", f"{nonzeros(m):,}",
                             f"{nb:,}", f"{nz:,}"])
    return markdown(["task", "method", "sparsity", "test acc %", "change (pt)", "nonzeros", "ONNX bytes",
                  "zstd ONNX bytes"], rows,
                 f"1. Unstructured pruning, same fine-tune budget ({ft.epochs} epochs)")


def seeds_sweep(sparsities: list[float], seeds: int, ft: FineTune) -> str:
    task = builtin_task("mnist1d-cnn")
    base = evaluate(task.model, task)
    rows = []
    for s in sparsities:
        t = [evaluate(torch_global_l1(task, s, ft, k), task) for k in range(seeds)]
        e = [evaluate(ours(task, {"sparsity": s, "schedule": "gradual"}, ft, k)[0], task) for k in range(seeds)]
        rows.append([f"{s:.0%}", pct(statistics.mean(t)), pct(statistics.mean(e)),
                     f"{100 * (statistics.mean(e) - statistics.mean(t)):+.2f}",
                     f"{100 * (statistics.mean(e) - base):+.2f}",
                     " ".join(pct(x) for x in t), " ".join(pct(x) for x in e)])
    return markdown(["sparsity", "torch prune mean %", "edgecompress mean %", "ours - torch (pt)", "ours vs baseline (pt)",
                  "torch per seed", "ours per seed"], rows,
                 f"2. mnist1d-cnn (baseline {pct(base)}%), mean over {seeds} seeds, {ft.epochs} epochs each")


def structured(cases: list[tuple[str, str, dict]], ft: FineTune, tmp: Path) -> str:
    rows = []
    previous = 0.0
    for i, (name, label, spec) in enumerate(cases):
        task = builtin_task(name)
        if spec.get("sparsity") == "match":  # the MAC reduction the previous row reached, to compare at equal MACs
            spec = {**spec, "sparsity": round(previous, 4)}
            label = f"{label} {previous:.1%}"
        model, ctx = ours(task, spec, ft, 0, workdir=tmp)
        pb, pm = tmp / f"s{i}b.onnx", tmp / f"s{i}m.onnx"
        mb = measure(task.model, task, onnx_path=pb, latency=False)
        mm = measure(model, task, onnx_path=pm, latency=False)
        lb, lm = compare_latency([pb, pm], task.example_input, batches=(64,), threads=1, repeats=50)
        rows.append([name, label, pct(mb.metric), pct(mm.metric), f"{100 * (mm.metric - mb.metric):+.2f}",
                     f"{mb.params:,} -> {mm.params:,}", f"{mb.macs:,} -> {mm.macs:,}", f"{mb.macs / mm.macs:.2f}x",
                     f"{mb.stored_bytes:,} -> {mm.stored_bytes:,}",
                     f"{lb['b64']:.3f} -> {lm['b64']:.3f}", f"{lb['b64'] / lm['b64']:.2f}x",
                     f"{mm.max_abs_diff:.1e}"])
        previous = 1 - mm.macs / mb.macs
    return markdown(["task", "recipe", "base acc %", "acc %", "change (pt)", "params", "MACs", "MACs fewer",
                  "ONNX bytes", "ORT ms b64", "speed-up", "ORT vs torch"], rows,
                 f"3-4. Structured channel pruning (Torch-Pruning graph), {ft.epochs} epochs fine-tune")


def nm(tasks: list[str], ft: FineTune, tmp: Path) -> str:
    rows = []
    for name in tasks:
        task = builtin_task(name)
        model, ctx = ours(task, {"granularity": "nm", "pattern": "2:4", "schedule": "gradual"}, ft, 0)
        pb, pm = tmp / "nb.onnx", tmp / "nm.onnx"
        export_onnx(task.model, task.example_input, pb)
        export_onnx(model, task.example_input, pm)
        lb, lm = compare_latency([pb, pm], task.example_input, batches=(64,), threads=1, repeats=50)
        base, acc = evaluate(task.model, task), evaluate(model, task)
        skipped = ", ".join(ctx.log.skipped) or "-"
        rows.append([name, pct(base), pct(acc), f"{100 * (acc - base):+.2f}", f"{nonzeros(model):,}",
                     f"{lb['b64']:.3f} / {lm['b64']:.3f}", skipped])
    return markdown(["task", "base acc %", "2:4 acc %", "change (pt)", "nonzeros", "ORT ms b64 dense / 2:4",
                  "layers kept dense"], rows, f"5. N:M 2:4 (gradual, {ft.epochs} epochs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer rows (for a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ft = FineTune(epochs=args.epochs, lr=args.lr)
    start = time.perf_counter()
    out: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sp = [0.9] if args.quick else [0.9, 0.95, 0.98]
        out.append(unstructured(["digits-lenet300", "digits-lenet5"] + ([] if args.quick else ["mnist1d-cnn"]), sp, ft, tmp))
        print(out[-1] + "\n", flush=True)
        sweep = [0.5, 0.9] if args.quick else [0.5, 0.7, 0.9, 0.95]
        out.append(seeds_sweep(sweep, 1 if args.quick else args.seeds, ft))
        print(out[-1] + "\n", flush=True)
        cases = [
            ("digits-resnet8", "channel 50% uniform, magnitude", {"granularity": "channel", "sparsity": 0.5, "scope": "layer"}),
            ("digits-resnet8", "channel 50% global, taylor", {"granularity": "channel", "sparsity": 0.5, "criterion": "taylor"}),
            ("digits-lenet5", "channel 50% uniform, magnitude", {"granularity": "channel", "sparsity": 0.5, "scope": "layer"}),
            ("mnist1d-cnn", "channel 30% uniform, magnitude", {"granularity": "channel", "sparsity": 0.3, "scope": "layer"}),
            ("mnist1d-cnn", "channel, sensitivity, MACs -", {"granularity": "channel", "sparsity": "match",
                                                             "scope": "sensitivity", "target": "macs"}),
            ("mnist1d-cnn", "channel 30% uniform, activation APoZ",
             {"granularity": "channel", "sparsity": 0.3, "scope": "layer", "criterion": "activation",
              "activation": "apoz"}),
            ("digits-resnet8", "block removal (1 of 3 candidates)", {"granularity": "block", "sparsity": 0.34}),
        ]
        if args.quick:
            cases = cases[:1]
        out.append(structured(cases, ft, tmp))
        print(out[-1] + "\n", flush=True)
        out.append(nm(["digits-lenet300", "digits-lenet5", "mnist1d-cnn"], ft, tmp))
        print(out[-1] + "\n", flush=True)
    print(f"(whole run: {time.perf_counter() - start:.0f} s, torch on 1 thread)")


if __name__ == "__main__":
    main()
