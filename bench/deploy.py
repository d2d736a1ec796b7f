"""Deployment footprint on microcontrollers: compressed C (per-layer weight formats) against today's
dense C and TFLite Micro, instruction counts under QEMU, and the targets edgecompress aims for.

1. Targets. digits-lenet5 and digits-lenet300 after ``recipes/deep-compression.yaml`` (prune + weight
   sharing) and mnist1d-cnn after ``recipes/deep-compression-mnist1d.yaml``, lowered to int8 (shared
   weights get one scale per tensor, so they stay few int8 codes): test accuracy of the integer
   reference (the C library is bit-exact with it), flash of the C library for Cortex-M4 with
   ``format: auto`` and with every layer dense (arm-none-eabi-size text+data), the .tflite file and
   TFLite Micro's arena, static RAM, and executed instructions per inference under
   ``qemu-system-arm -M mps2-an386 -icount shift=0``.
2. Kernels. One layer (Linear 800 -> 500 and Conv2d 20 -> 50, 5x5 on 12x12, LeNet-5's fc1 and conv2;
   a depthwise 3x3 convolution of 32 channels on 16x16) with 90% of its int8 codes zero, at random or
   in blocks of 4 consecutive weights of a row: instructions of each weight format against dense, and instructions per MAC of each dense kernel
   (conv, depthwise, Linear), on Cortex-M4.
3. The four built-in conv tasks after a static int8 quantize stage, dense C against TFLite Micro.

    python -m bench.deploy                     # all three (about 15 minutes on a loaded 2-core machine)
    python -m bench.deploy --part kernels      # one part: targets, kernels or dense
    python -m bench.deploy --part targets --task mnist1d-cnn
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecompress.context import Context
from edgecompress.export import c as cexp
from edgecompress.export import tflite as tf
from edgecompress.export.cformats import weight_rows
from edgecompress.export.ir import lower, lower_task, plan_arena, run_int
from edgecompress.pipeline import compress
from edgecompress.recipe import Recipe
from edgecompress.techniques import quantize as QZ
from edgecompress.zoo import builtin_task

from ._table import print_table

ROOT = Path(__file__).parents[1]
TARGETS = {  # task: (recipe, flash target in bytes, largest accuracy loss allowed)
    "digits-lenet5": ("deep-compression.yaml", 64 * 1024, 0.005),
    "digits-lenet300": ("deep-compression.yaml", 32 * 1024, 0.01),
    "mnist1d-cnn": ("mnist1d-cortex-m4.yaml", 12 * 1024, 0.01),
}
TASKS = ("digits-lenet5", "mnist1d-cnn", "digits-resnet8", "digits-mobilenet")


def _accuracy(g, t) -> tuple[float, np.ndarray]:
    x = torch.cat([xb for xb, _ in t.eval_data])
    y = torch.cat([yb for _, yb in t.eval_data]).numpy()
    q = g.quantize_input(x)
    return float((run_int(g, q).argmax(1) == y).mean()), q


def target_row(name: str, workdir: Path) -> list[str]:
    recipe_file, limit, drop = TARGETS[name]
    t = builtin_task(name)
    recipe = Recipe.from_yaml(ROOT / "recipes" / recipe_file)
    recipe = Recipe.from_dict({**recipe.to_dict(), "task": name, "export": [], "measure": {"latency": False}})
    model = compress(t, recipe).model.eval()
    x = torch.cat([xb for xb, _ in t.eval_data])
    y = torch.cat([yb for _, yb in t.eval_data]).numpy()
    with torch.no_grad():
        base_acc = float((t.model(x).argmax(1).numpy() == y).mean())
    g = lower_task(model, t, "c")
    acc, q = _accuracy(g, t)
    auto = cexp.export_c(g, workdir / name / "auto", name="net")
    dense = cexp.export_c(g, workdir / name / "dense", name="net", weight_format="dense")
    assert np.array_equal(cexp.run_host(auto, q), run_int(g, q))  # bit-exact on every test input
    sa, sd = cexp.arm_size(auto), cexp.arm_size(dense)
    ia = cexp.count_instructions(auto, q[:2]).per_inference
    idn = cexp.count_instructions(dense, q[:2]).per_inference
    data = tf.to_tflite(g)
    formats = ", ".join(f"{k} {e.describe()} {e.nbytes:,} B" for k, e in auto.formats.items())
    ok = sa.flash <= limit and base_acc - acc <= drop and sa.ram <= sd.ram
    print(f"{name}: {formats}; flash {sa.flash:,} ({sa.kernels:,} of kernel code; dense {sd.flash:,}), accuracy "
          f"{base_acc:.4f} -> {acc:.4f}, instructions {ia:,} (dense {idn:,})", flush=True)
    return [name, f"{base_acc:.4f} -> {acc:.4f}", f"{sa.flash:,}", f"<= {limit:,}", "yes" if ok else "NO",
            f"{sd.flash:,}", f"{len(data):,}", f"{sa.ram:,}", f"{sd.ram:,}", f"{tf.tflm_arena_bytes(data):,}",
            f"{ia:,}", f"{idn:,}", f"{g.macs:,}"]


def _one_layer(make, shape: tuple[int, ...], sparsity: float, block: int = 1):
    """The layer's integer graph with a ``sparsity`` fraction of its blocks of ``block`` consecutive weights of
    a row (in the C kernels' order) zero, and two inputs."""
    torch.manual_seed(0)  # the same weights on every run
    gen = torch.Generator().manual_seed(1)
    m = nn.Sequential(make()).eval()
    x = torch.rand(4, *shape, generator=gen)
    g = lower(m, x[:1], calib=[x])
    op = g.ops[0]
    rng = np.random.default_rng(0)
    if block == 1:
        q = op.qweight.copy()
        q[rng.random(q.shape) < sparsity] = 0
        op.qweight = q
    else:
        rows = weight_rows(op)
        pruned = np.repeat(rng.random((rows.shape[0], -(-rows.shape[1] // block))) < sparsity, block, axis=1)
        rows[pruned[:, :rows.shape[1]]] = 0
        op.qweight = (rows.T if op.kind == "dwconv" else rows).reshape(op.qweight.shape).astype(np.int8)
    return g, g.quantize_input(x[:2])


def kernel_rows(workdir: Path) -> list[list[str]]:
    rows = []
    for label, layer, shape in (("Linear 800->500", lambda: nn.Linear(800, 500), (800,)),
                                ("Conv2d 20->50 5x5", lambda: nn.Conv2d(20, 50, 5), (20, 12, 12)),
                                ("Depthwise 32ch 3x3", lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32),
                                 (32, 16, 16))):
        for sparsity, block in ((0.0, 1), (0.9, 1), (0.9, 4)):
            g, q = _one_layer(layer, shape, sparsity, block)
            ref = run_int(g, q).reshape(len(q), -1)
            counts = {}
            for fmt in ("dense", "int4", "codebook", "channel-codebook", "sparse/bitmask", "sparse/runs",
                        "sparse/runs4", "sparse/blocks", "sparse-codebook"):
                exp = cexp.export_c(g, workdir / "kernels" / fmt.replace("/", "-"), name="k", weight_format=fmt)
                e = next(iter(exp.formats.values()))
                if e.reason.endswith("fell back to the smallest that fits"):
                    continue
                c = cexp.count_instructions(exp, q)
                assert np.array_equal(c.outputs, ref)
                counts[fmt] = (c.per_inference, e.nbytes, e)
            d = counts["dense"][0]
            for fmt, (n, nbytes, e) in counts.items():
                what = f"dense ({g.ops[0].kind})" if fmt == "dense" else e.describe()  # dense: ec_conv, ec_dwconv, ec_fc
                rows.append([label, f"{sparsity:.0%}" + (f", blocks of {block}" if block > 1 else ""), what, f"{nbytes:,}", f"{n:,}", f"{n / d:.2f}x",
                             f"{n / g.macs:.2f}"])
    return rows


def dense_row(name: str, workdir: Path) -> list[str]:
    t = builtin_task(name)
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", bits=8, reduce_range=False,
                                                          keep_slow_float=False), Context(task=t, seed=0)).eval()
    g = lower_task(qm, t, "c")
    acc, q = _accuracy(g, t)
    exp = cexp.export_c(g, workdir / name, name="net", weight_format="dense")
    c_out = cexp.run_host(exp, q)
    size = cexp.arm_size(exp, "cortex-m4")
    data = tf.to_tflite(g)
    tflm_out = tf.run_tflm(data, q)
    plan = plan_arena(g)
    n = cexp.count_instructions(exp, q[:2]).per_inference
    return [name, f"{acc:.4f}", "yes" if np.array_equal(c_out, tflm_out) else "NO", f"{size.flash:,}",
            f"{len(data):,}", f"{size.ram:,}", f"{tf.tflm_arena_bytes(data):,}", f"{plan.total:,}", f"{n:,}",
            f"{n / g.macs:.2f}"]


def targets_table(work: Path, tasks: list[str]) -> None:
    print("## Targets: compressed C (format: auto) for Cortex-M4 against dense C and TFLite Micro\n")
    rows = [target_row(n, work) for n in tasks]
    print_table(["task", "accuracy float -> int8", "C flash", "target", "met", "dense C flash", ".tflite",
                 "C RAM", "dense C RAM", "TFLM arena", "instr (auto)", "instr (dense)", "MACs"], rows)
    print("\nFlash: arm-none-eabi-size text+data of the model and kernel objects (-Os, Cortex-M4); .tflite: the "
          "file alone (TFLite Micro's interpreter adds code). Instructions: per inference, measured under "
          "qemu-system-arm -M mps2-an386 -icount shift=0. Met: flash within target, accuracy loss within "
          "the target's (0.5 point for LeNet-5, 1 point otherwise), RAM no more than dense C's.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("targets", "kernels", "dense"), action="append",
                    help="run only this part (repeatable; default all)")
    ap.add_argument("--task", choices=tuple(TARGETS), action="append", help="targets of this task only (repeatable)")
    args = ap.parse_args()
    parts = args.part or ["targets", "kernels", "dense"]
    if not cexp.have_toolchain():
        raise SystemExit("needs arm-none-eabi-gcc and qemu-system-arm: make toolchain")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "targets" in parts:
            targets_table(work, args.task or list(TARGETS))
        if "kernels" in parts:
            print("## Kernels: one layer, 90% of its int8 codes zero (at random, in blocks of 4), Cortex-M4 (mps2-an386, -icount shift=0)\n")
            print_table(["layer", "zeros", "format", "weight bytes", "instructions", "vs dense", "instr/MAC"],
                        kernel_rows(work))
        if "dense" in parts:
            print("\n## Today's dense C against TFLite Micro (static int8 quantize stage)\n")
            print_table(["task", "int8 acc", "C == TFLM", "C flash", ".tflite", "C RAM", "TFLM arena",
                         "sum of activations", "instr (M4)", "instr/MAC"], [dense_row(n, work) for n in TASKS])


if __name__ == "__main__":
    main()
