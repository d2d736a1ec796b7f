"""Every technique and export on models written as users write them: the conformance matrix.

    python -m bench.conformance                      # all of it (prints the table, writes JSON)
    python -m bench.conformance --arch vit_mha --col "quantize static"

Rows: the architectures in ``edgecompress.zoo.architectures`` plus ``minilm-embed`` (HF BERT layers).
Columns: each prune granularity, each quantize mode, cluster, each low-rank method, distill (a stage
with a small student), and the exports .ecz (of the cluster stage's model), TFLite and C (of the
static int8 model). A cell either works — the exported file loads, ONNX Runtime (or LiteRT / the
compiled C library) agrees with the torch model within the column's bound, and the metric after a
one-epoch fine-tune is reported — or is unsupported with edgecompress's one-line reason
(``RecipeError``, exit code 2 from the CLI). A file outside the bound is a mismatch (DIFF);
anything else is a crash, printed with its traceback and counted; the matrix's target is none.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgecompress.errors import ArtifactError, RecipeError

from ._table import line, markdown

ARCH_MODULE = "edgecompress.zoo.architectures"
ROWS = ["mobilenet_v3_small", "shufflenet_v2", "resnet18", "regnet", "vit_mha", "transformer_encoder", "dense_se",
        "audio_cnn", "text_gru", "minilm"]
FT = {"epochs": 1, "lr": 5e-4}
COLUMNS: dict[str, dict] = {
    "prune unstructured": {"stage": "prune", "granularity": "unstructured", "sparsity": 0.5},
    "prune balanced": {"stage": "prune", "granularity": "balanced", "sparsity": 0.5},
    "prune 2:4": {"stage": "prune", "granularity": "nm", "pattern": "2:4"},
    "prune channel": {"stage": "prune", "granularity": "channel", "sparsity": 0.3},
    "prune block": {"stage": "prune", "granularity": "block", "sparsity": 0.3},
    "quantize static": {"stage": "quantize", "mode": "static"},
    "quantize dynamic": {"stage": "quantize", "mode": "dynamic"},
    "quantize weight_only": {"stage": "quantize", "mode": "weight_only", "bits": 4, "granularity": "group",
                             "group_size": 16},
    "quantize qat": {"stage": "quantize", "mode": "qat"},
    "cluster": {"stage": "cluster", "bits": 5},
    "lowrank svd": {"stage": "lowrank", "method": "svd", "ratio": 0.5},
    "lowrank tucker2": {"stage": "lowrank", "method": "tucker2", "ratio": 0.5},
    "lowrank cp": {"stage": "lowrank", "method": "cp", "ratio": 0.5},
    "distill": {"stage": "distill", "train": {"epochs": 30, "lr": 3e-3}},
}
EXPORTS = ["ecz", "tflite", "c"]
#: torch vs ONNX Runtime: float models within this relative error of the largest output; quantized
#: ones agree on at least this fraction of argmaxes (cosine for embeddings) — the torch model
#: simulates the integer kernels, so they agree up to rounding ties
FLOAT_REL = 1e-4
QUANT_AGREE = 0.97


class Mismatch(AssertionError):
    """The exported file runs but its outputs are outside the column's bound."""


@dataclass
class Cell:
    arch: str
    column: str
    status: str  # works | unsupported | mismatch | crash
    detail: str
    seconds: float
    metric_before: float | None = None
    metric_after: float | None = None


def task_ref(arch: str) -> str:
    return "minilm-embed" if arch == "minilm" else f"{ARCH_MODULE}:{arch}"


def stage_for(arch: str, column: str, epochs: int) -> dict:
    stage = json.loads(json.dumps(COLUMNS[column]))
    if column == "distill":
        stage["student"] = f"{ARCH_MODULE}:student_{'embed' if arch == 'minilm' else arch}"
        stage["train"]["epochs"] = 30 if epochs else 1
    elif column == "quantize qat" or epochs:
        stage["finetune"] = {**FT, "epochs": max(epochs, 1) if column == "quantize qat" else epochs}
    return stage


def agreement(torch_out: torch.Tensor, other: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(largest |difference| relative to the largest |torch output|, argmax agreement or cosine)."""
    other = torch.as_tensor(np.asarray(other), dtype=torch.float32).reshape(torch_out.shape)
    rel = float((torch_out - other).abs().max() / torch_out.abs().max().clamp_min(1e-12))
    if torch_out.dim() == 2 and torch_out.shape[1] <= 100:
        agree = float((torch_out.argmax(1) == other.argmax(1)).float().mean())
    else:
        agree = float(torch.nn.functional.cosine_similarity(torch_out.flatten(1), other.flatten(1)).mean())
    return rel, agree


def check_onnx(result, path: Path, quantized: bool) -> str:
    """Load the exported ONNX file in ONNX Runtime and compare it with the torch model on the test split."""
    from edgecompress.export.onnx import run, session
    from edgecompress.task import predict

    out, _ = predict(result.model, result.task.eval_data)
    xs = torch.cat([x for x, _ in result.task.eval_data])
    rel, agree = agreement(out, run(session(path), xs))
    ok = agree >= QUANT_AGREE if quantized else rel <= FLOAT_REL
    if not ok:
        raise Mismatch(f"ONNX Runtime disagrees with torch: relative difference {rel:.2e}, agreement {agree:.4f}")
    return f"ORT agree {agree:.3f}" if quantized else f"ORT rel diff {rel:.1e}"


def run_cell(arch: str, column: str, *, epochs: int = 1, keep: dict | None = None, task=None) -> Cell:
    """One technique cell: compress, export ONNX, compare ONNX Runtime with torch (``task``: instead of
    the row's own, e.g. a tiny one in the tests)."""
    import edgecompress as ec

    t0 = time.perf_counter()
    stage = stage_for(arch, column, epochs)
    recipe = ec.Recipe.from_dict({"task": task_ref(arch), "seed": 0, "stages": [stage],
                                  "measure": {"latency": False, "batches": [1]}})
    try:
        result = ec.compress(task if task is not None else _task(arch), recipe)
        row = result.report.rows[-1]
        if not row.touched and column != "distill":
            return Cell(arch, column, "unsupported", f"{column} changed no layer: {_untouched(result, row)}",
                        time.perf_counter() - t0)
        quantized = column.startswith("quantize")
        if keep is not None:  # the exports of this model give their own answer even when ONNX Runtime disagrees
            keep[(arch, column)] = result
        with tempfile.TemporaryDirectory() as tmp:
            path = result.export_onnx(Path(tmp) / "model.onnx")
            detail = check_onnx(result, path, quantized)
        base, final = result.report.baseline, result.report.final
        return Cell(arch, column, "works", detail, time.perf_counter() - t0, base.metric, final.metric)
    except (RecipeError, ArtifactError) as e:
        return Cell(arch, column, "unsupported", str(e), time.perf_counter() - t0)
    except Mismatch as e:
        return Cell(arch, column, "mismatch", str(e), time.perf_counter() - t0)
    except Exception as e:  # the harness counts crashes; it never hides them: the traceback is printed
        traceback.print_exc()
        return Cell(arch, column, "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                    time.perf_counter() - t0)


def _untouched(result, row) -> str:
    """Why a stage changed nothing: the layers holding most of the weights, their types and the reason."""
    mods = dict(result.model.named_modules())
    own = [(n, m) for n, m in mods.items() if n and any(True for _ in m.parameters(recurse=False))]
    own.sort(key=lambda nm: (nm[0] not in row.skipped, -sum(p.numel() for p in nm[1].parameters(recurse=False))))
    parts = []
    for n, m in own[:2]:
        default = ("not among the stage's candidates" if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
                   else "not a layer type the technique handles (Linear, Conv1d, Conv2d)")
        parts.append(f"{n} ({type(m).__name__}): {row.skipped.get(n, default)}")
    return "; ".join(parts)


def run_export(arch: str, fmt: str, source, error: str | None) -> Cell:
    """One export cell, of the model the source column produced (cluster for .ecz, static int8 otherwise)."""
    t0 = time.perf_counter()
    if source is None:
        return Cell(arch, fmt, "unsupported", f"needs the model of its source column: {error}", 0.0)
    try:
        detail = {"ecz": _ecz, "tflite": _tflite, "c": _c}[fmt](source)
        return Cell(arch, fmt, "works", detail, time.perf_counter() - t0, source.report.baseline.metric,
                    source.report.final.metric)
    except (RecipeError, ArtifactError) as e:
        return Cell(arch, fmt, "unsupported", str(e), time.perf_counter() - t0)
    except Mismatch as e:
        return Cell(arch, fmt, "mismatch", str(e), time.perf_counter() - t0)
    except Exception as e:  # counted and printed, never hidden
        traceback.print_exc()
        return Cell(arch, fmt, "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                    time.perf_counter() - t0)


def _ecz(result) -> str:
    import edgecompress as ec
    from edgecompress.task import predict

    with tempfile.TemporaryDirectory() as tmp:
        path = result.save(Path(tmp) / "model.ecz")
        loaded = ec.load(path)
        out, _ = predict(result.model, result.task.eval_data)
        xs = torch.cat([x for x, _ in result.task.eval_data])
        with torch.no_grad():
            rel, _ = agreement(out, loaded(xs))
        onnx_bytes = result.export_onnx(Path(tmp) / "model.onnx").stat().st_size
        if rel > FLOAT_REL:
            raise Mismatch(f".ecz model disagrees with torch: relative difference {rel:.2e}")
        return f"{path.stat().st_size:,} B (ONNX {onnx_bytes:,}), rel diff {rel:.1e}"


def _tflite(result) -> str:
    from edgecompress.export import tflite as tf
    from edgecompress.export.ir import lower_task, run_int

    g = lower_task(result.model, result.task, "tflite")
    xs = torch.cat([x for x, _ in result.task.eval_data])
    q = g.quantize_input(xs)
    ref = run_int(g, q)
    data = tf.to_tflite(g, int8=True)
    micro = tf.run_tflm(data, q[:16])  # the microcontroller runtime computes the reference's integers
    if not np.array_equal(micro, ref[:16]):
        raise Mismatch(f"TFLite Micro differs from the integer reference by "
                       f"{int(np.abs(micro.astype(int) - ref[:16]).max())}")
    litert = tf.run_litert(data, q, delegate=False)
    err = int(np.abs(litert.astype(int) - ref).max())
    _, agree = agreement(torch.from_numpy(ref.astype(np.float32)), litert.astype(np.float32))
    if agree < QUANT_AGREE:  # LiteRT's optimized kernels round some steps apart; deep nets add those up
        raise Mismatch(f"LiteRT int8 agrees with the integer reference on {agree:.3f} of argmaxes (largest "
                       f"difference {err})")
    with torch.no_grad():
        _, torch_agree = agreement(result.model(xs), ref.astype(np.float32))
    return (f"TFLite Micro bit-exact on 16 inputs; LiteRT = reference +-{err}, argmax agreement {agree:.3f} "
            f"(reference and torch {torch_agree:.3f})")


def _c(result) -> str:
    from edgecompress.export import c as cexp
    from edgecompress.export.ir import lower_task, run_int

    g = lower_task(result.model, result.task, "c")
    xs = torch.cat([x for x, _ in result.task.eval_data])[:16]
    q = g.quantize_input(xs)
    with tempfile.TemporaryDirectory() as tmp:
        exp = cexp.export_c(g, Path(tmp) / "c", name="net")
        out = cexp.run_host(exp, q)
    if not np.array_equal(out, run_int(g, q)):
        raise Mismatch("the compiled C library differs from the integer reference")
    return f"gcc host build bit-exact on {len(q)} inputs"


_TASKS: dict = {}


def _task(arch: str):
    """Each task built once per process (its baseline is cached on disk after the first training)."""
    from edgecompress.zoo import load_task

    if arch not in _TASKS:
        if arch == "minilm":  # transformers imports torchvision when it is installed: make that import work
            from edgecompress.zoo.architectures import import_torchvision
            import_torchvision()
        _TASKS[arch] = load_task(task_ref(arch))
    return _TASKS[arch]


def run_row(arch: str, columns: list[str], exports: list[str], epochs: int = 1, progress=None) -> list[Cell]:
    keep: dict = {}
    cells = []
    errors: dict[str, str] = {}
    for col in columns:
        cell = run_cell(arch, col, epochs=epochs, keep=keep)
        errors[col] = cell.detail
        cells.append(cell)
        if progress:
            progress(cell)
    for fmt in exports:
        src = "cluster" if fmt == "ecz" else "quantize static"
        if src not in columns:
            cell = run_cell(arch, src, epochs=0, keep=keep)
            errors[src] = cell.detail
        cell = run_export(arch, fmt, keep.get((arch, src)), errors.get(src))
        cells.append(cell)
        if progress:
            progress(cell)
    return cells


SPEED_ROWS = ["vit_mha", "transformer_encoder", "dense_se"]
#: post-training static int8 with defaults and with MSE ranges and GPTQ rounding, and quantization-aware
#: training with learned step sizes (LSQ, MSE initial ranges) for eight epochs: all run as the same integer
#: kernels in ONNX Runtime
SPEED_STAGES = {"static": {"stage": "quantize", "mode": "static"},
                "static mse gptq": {"stage": "quantize", "mode": "static", "observer": "mse", "rounding": "gptq"},
                "qat lsq 8 ep": {"stage": "quantize", "mode": "qat", "lsq": True, "observer": "mse",
                                 "finetune": {"epochs": 8, "lr": 5e-4}}}


def speed(archs: list[str], repeats: int = 50) -> str:
    """Static int8 (post-training with default options and with MSE/GPTQ, and QAT with LSQ) against
    fp32: accuracy of both exported ONNX files in ONNX Runtime on every held-out example (``held_out``:
    1,157 digits, where the test split's 256 would make one image 0.39 points) and their latency (1
    thread, round-robin in one loop, median), with the integer kernels ONNX Runtime ran."""
    import edgecompress as ec
    from edgecompress.export.onnx import export_onnx, run, session
    from edgecompress.measure import compare_latency
    from edgecompress.zoo.architectures import held_out

    lines = [markdown(["model", "int8 by", "fp32 accuracy (ORT)", "int8 accuracy (ORT)", "change (points)",
                       "ms b1 fp32 / int8", "ms b64 fp32 / int8", "speed-up b64", "kernels"], [])]
    for arch in archs:
        task = _task(arch)
        xs, ys = held_out(arch)

        def accuracy(path: Path) -> float:
            return float((torch.as_tensor(run(session(path), xs)).argmax(1) == ys).float().mean())

        for label, stage in SPEED_STAGES.items():
            recipe = ec.Recipe.from_dict({"seed": 0, "stages": [stage], "measure": {"latency": False}})
            result = ec.compress(task, recipe)
            kernels = next((n for n in result.report.rows[-1].notes if n.startswith("ONNX Runtime integer kernels")),
                           "")
            with tempfile.TemporaryDirectory() as tmp:
                paths = [export_onnx(task.model, task.example_input, Path(tmp) / "fp32.onnx"),
                         result.export_onnx(Path(tmp) / "int8.onnx")]
                base, acc = accuracy(paths[0]), accuracy(paths[1])
                lat = compare_latency(paths, task.example_input, (1, 64), 1, repeats)
            lines.append(line([arch, label, f"{base:.4f}", f"{acc:.4f}", f"{100 * (acc - base):+.2f}",
                               f"{lat[0]['b1']:.3f} / {lat[1]['b1']:.3f}", f"{lat[0]['b64']:.2f} / {lat[1]['b64']:.2f}",
                               f"{lat[0]['b64'] / lat[1]['b64']:.2f}x",
                               kernels.removeprefix('ONNX Runtime integer kernels: ')]))
            print(lines[-1], flush=True)
    return "\n".join(lines)


def table(cells: list[Cell]) -> str:
    """Markdown: one row per architecture, one column per technique/export; a footnote per reason."""
    archs = list(dict.fromkeys(c.arch for c in cells))
    cols = list(dict.fromkeys(c.column for c in cells))
    by = {(c.arch, c.column): c for c in cells}
    reasons: list[str] = []
    rows = []
    for a in archs:
        row = []
        for col in cols:
            c = by.get((a, col))
            if c is None:
                row.append("")
            elif c.status == "works":
                row.append("ok" if c.metric_after is None else f"{c.metric_after:.3f}")
            else:
                if c.detail not in reasons:
                    reasons.append(c.detail)
                mark = {"unsupported": "no", "mismatch": "DIFF"}.get(c.status, "CRASH")
                row.append(f"{mark} [{reasons.index(c.detail) + 1}]")
        rows.append([a, *row])
    lines = [markdown(["model", *cols], rows)]
    works = sum(c.status == "works" for c in cells)
    crashes = sum(c.status == "crash" for c in cells)
    diffs = sum(c.status == "mismatch" for c in cells)
    lines += ["", f"{works} of {len(cells)} cells work ({100 * works / max(len(cells), 1):.0f}%), "
              f"{len(cells) - works - crashes - diffs} unsupported with a reason, {diffs} outside the agreement "
              f"bound (DIFF), {crashes} crashes (tracebacks).", ""]
    from edgecompress.export.ir import SUPPORTED

    tail = f"; supported: {SUPPORTED}"
    lines += [f"{i + 1}. {r.removesuffix(tail)}" for i, r in enumerate(reasons)]
    if any(r.endswith(tail) for r in reasons):
        lines += ["", f"What the TFLite and C exports lower: {SUPPORTED}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="rows to run (default: all)")
    ap.add_argument("--col", action="append", help="columns to run (default: all)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tune epochs after each technique")
    ap.add_argument("--json", type=Path, default=Path("edgecompress-out/conformance.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="static int8 against fp32 on the attention and "
                    "concatenation models: accuracy change and ONNX Runtime latency")
    ap.add_argument("--merge", type=Path, nargs="*", help="print the table of these JSON results and exit")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI: MiniLM ships inside its package
    if args.speed:
        torch.set_num_threads(args.threads)
        print(speed(args.arch or SPEED_ROWS))
        return 0
    if args.merge:
        merged: dict[tuple[str, str], Cell] = {}  # a later file's cell replaces an earlier run of the same cell
        for path in args.merge:
            for c in json.loads(path.read_text()):
                if c["status"] == "crash" and c["detail"].startswith("AssertionError: ONNX Runtime disagrees"):
                    c["status"], c["detail"] = "mismatch", c["detail"].removeprefix("AssertionError: ")
                if c["detail"].startswith("needs the model of its source column") and (c["arch"], c["column"]) in merged:
                    continue  # an export left out because its source failed in this run: keep the earlier answer
                merged[(c["arch"], c["column"])] = Cell(**c)
        order = {a: i for i, a in enumerate(ROWS)}
        cells = sorted(merged.values(), key=lambda c: order.get(c.arch, len(ROWS)))
        print(table(cells))
        return 1 if any(c.status == "crash" for c in cells) else 0
    torch.set_num_threads(args.threads)
    archs = args.arch or ROWS
    cols = [c for c in (args.col or [*COLUMNS, *EXPORTS])]
    techs = [c for c in cols if c in COLUMNS]
    exports = [c for c in cols if c in EXPORTS]
    cells: list[Cell] = []
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def progress(c: Cell) -> None:
        cells.append(c)
        print(f"{c.arch:20} {c.column:22} {c.status:11} {c.seconds:6.1f}s  "
              f"{'' if c.metric_after is None else f'{c.metric_before:.3f} -> {c.metric_after:.3f}  '}{c.detail}",
              flush=True)
        args.json.write_text(json.dumps([asdict(x) for x in cells], indent=1))

    for a in archs:
        if a == "minilm":
            from edgecompress.zoo import minilm
            if not minilm.available():
                print("minilm: the transformers extra is not installed; row left out", file=sys.stderr)
                continue
        run_row(a, techs, exports, args.epochs, progress)
    print()
    print(table(cells))
    return 1 if any(c.status == "crash" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
