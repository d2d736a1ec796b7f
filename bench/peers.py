"""edgecompress against peer tools on the digits tasks, side by side from one run.

    python -m bench.peers [--tasks digits-lenet300 digits-lenet5] [--epochs 10]

Rows per task: the dense baseline; edgecompress recipes (deep-compression, written as .ecz;
prune-90, written as ONNX); torch.nn.utils.prune global L1 at 90% with the same fine-tune budget, its
ONNX file zipped (DEFLATE); ONNX Runtime static int8 quantization (QDQ, calibrated on validation
data); Torch-Pruning structured magnitude pruning of 50% of the hidden channels with the same
fine-tune budget. Accuracy is ONNX Runtime on the held-out test split; bytes are files on disk;
ratio is the baseline's dense fp32 bytes over them; latency is ONNX Runtime (1 thread, median,
measured round-robin over all rows of a task in one loop).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

import edgecompress as ec
from edgecompress.export.onnx import export_onnx
from edgecompress.finetune import finetune
from edgecompress.measure import compare_latency, measure
from edgecompress.spec import FineTune
from edgecompress.zoo import builtin_task

from ._peers import calibration, torch_global_l1
from ._table import markdown

RECIPES = Path(ec.__file__).parent / "recipes"


def ours(task, recipe_name: str, out: Path) -> tuple[Path, Path]:
    """(stored file, ONNX file that runs) for an edgecompress recipe."""
    recipe = ec.Recipe.from_yaml(RECIPES / recipe_name)
    recipe.task = task.name
    recipe.measure.latency = False
    result = ec.compress(task, recipe)
    onnx_path = result.export_onnx(out / f"{recipe_name}.onnx")
    if "ecz" in recipe.export:
        return result.save(out / f"{recipe_name}.ecz"), onnx_path
    return onnx_path, onnx_path


def torch_prune(task, ft: FineTune, out: Path) -> tuple[Path, Path]:
    model = torch_global_l1(task, 0.9, ft, 0)
    onnx_path = export_onnx(model, task.example_input, out / "torch-prune.onnx")
    zipped = out / "torch-prune.onnx.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(onnx_path, "model.onnx")
    return zipped, onnx_path


def ort_int8(task, out: Path) -> tuple[Path, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32 = export_onnx(task.model, task.example_input, out / "fp32.onnx")
    int8 = out / "ort-int8.onnx"
    quantize_static(str(fp32), str(int8), calibration(task), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return int8, int8


def torch_pruning(task, ft: FineTune, out: Path) -> tuple[Path, Path]:
    import torch_pruning as tp

    model = copy.deepcopy(task.model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    pruner = tp.pruner.MagnitudePruner(model, task.example_input, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[layers[-1]], in_channel_groups={},
                                       out_channel_groups={}, num_heads={})
    pruner.step()
    finetune(model, task.train_data, ft, loss=task.loss, seed=0)
    path = export_onnx(model.eval(), task.example_input, out / "torch-pruning.onnx")
    return path, path


def table(name: str, epochs: int) -> str:
    task = builtin_task(name)
    ft = FineTune(epochs=epochs, lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = export_onnx(task.model, task.example_input, out / "baseline.onnx")
        rows: list[tuple[str, Path, Path, float]] = [("baseline (fp32 ONNX)", base, base, 0.0)]
        makers = [("edgecompress deep-compression (.ecz)", lambda: ours(task, "deep-compression.yaml", out)),
                  ("edgecompress prune-90 (ONNX)", lambda: ours(task, "prune-90.yaml", out)),
                  ("torch.nn.utils.prune L1 90% (ONNX zipped)", lambda: torch_prune(task, ft, out)),
                  ("onnxruntime static int8 (QDQ ONNX)", lambda: ort_int8(task, out)),
                  ("Torch-Pruning 50% channels (ONNX)", lambda: torch_pruning(task, ft, out))]
        for label, make in makers:
            t0 = time.perf_counter()
            stored, runnable = make()
            rows.append((label, stored, runnable, time.perf_counter() - t0))
        dense = measure(task.model, task, latency=False).dense_bytes
        lat = compare_latency([r[2] for r in rows], task.example_input, (1, 64), threads=1, repeats=50)
        cells = []
        for (label, stored, runnable, secs), l in zip(rows, lat):
            m = measure(runnable, task, latency=False)
            size = stored.stat().st_size
            cells.append([label, f"{m.metric:.4f}", f"{size:,}", f"{dense / size:.1f}x", f"{l['b1']:.3f}",
                          f"{l['b64']:.3f}", f"{secs:.0f}"])
    return markdown(["method", "test accuracy", "bytes on disk", "ratio", "ms b1", "ms b64", "time s"], cells, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits-lenet300", "digits-lenet5"])
    p.add_argument("--epochs", type=int, default=10, help="fine-tune epochs of the peer rows")
    args = p.parse_args()
    print(f"edgecompress {ec.__version__}, torch {torch.__version__}, run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    for name in args.tasks:
        print()
        print(table(name, args.epochs), flush=True)


if __name__ == "__main__":
    main()
