"""Deployment footprint: edgecompress's C export against TFLite Micro for the same int8 model.

For digits-lenet5, mnist1d-cnn, digits-resnet8 (residual adds) and digits-mobilenet (depthwise,
ReLU6), after a static int8 quantize stage (per-channel weights), prints:
flash of the C library for Cortex-M4 (arm-none-eabi-size text+data: weights, multipliers and kernels)
against the .tflite file's bytes (TFLite Micro's interpreter code is not counted for it); peak RAM
of the C library (its one static arena) against the arena TFLite Micro reports for the model; the
planned arena against the sum of all activation tensors; and test accuracy of both runtimes.

    python -m bench.deploy
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgecompress.context import Context
from edgecompress.export import c as cexp
from edgecompress.export import tflite as tf
from edgecompress.export.lower import lower_task, plan_arena, run_int
from edgecompress.techniques import quantize as QZ
from edgecompress.zoo import builtin_task

TASKS = ("digits-lenet5", "mnist1d-cnn", "digits-resnet8", "digits-mobilenet")


def row(name: str, workdir: Path) -> dict:
    t = builtin_task(name)
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", bits=8, reduce_range=False),
                  Context(task=t, seed=0)).eval()
    g = lower_task(qm, t, "c")
    plan = plan_arena(g)
    x = torch.cat([xb for xb, _ in t.eval_data])
    y = torch.cat([yb for _, yb in t.eval_data]).numpy()
    q = g.quantize_input(x)
    t0 = time.perf_counter()
    exp = cexp.export_c(g, workdir / name, name="net")
    c_out = cexp.run_host(exp, q)
    size = cexp.arm_size(exp, "cortex-m4")
    c_time = time.perf_counter() - t0
    data = tf.to_tflite(g)
    tflm_out = tf.run_tflm(data, q)
    with torch.no_grad():
        float_acc = float((t.model(x).argmax(1).numpy() == y).mean())
    return {
        "task": name, "float acc": float_acc,
        "C acc": float((c_out.argmax(1) == y).mean()), "TFLM acc": float((tflm_out.argmax(1) == y).mean()),
        "C == TFLM": bool(np.array_equal(c_out, tflm_out)), "C == ref": bool(np.array_equal(c_out, run_int(g, q))),
        "C flash": size.flash, "TFLM flash": len(data),
        "C RAM": size.ram, "TFLM arena": tf.tflm_arena_bytes(data),
        "planned arena": plan.peak, "sum of activations": plan.total, "weights": g.weight_bytes,
        "c build+run s": c_time,
    }


def main() -> None:
    if not cexp.have_toolchain():
        raise SystemExit("needs arm-none-eabi-gcc and qemu-system-arm: make toolchain")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(n, Path(tmp)) for n in TASKS]
    head = ["task", "float acc", "C acc", "TFLM acc", "C == TFLM", "C flash", "TFLM flash", "C RAM", "TFLM arena",
            "planned arena", "sum of activations"]
    fmt = {float: lambda v: f"{v:.4f}", int: lambda v: f"{v:,}", bool: lambda v: "yes" if v else "NO", str: str}
    cells = [[fmt[type(r[h])](r[h]) for h in head] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("int8 (static quantize stage, per-channel weights); C for Cortex-M4 (-Os) vs TFLite Micro")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    for r in rows:
        print(f"{r['task']}: C flash {r['C flash'] / r['TFLM flash']:.3f}x of the .tflite, C RAM "
              f"{r['C RAM'] / r['TFLM arena']:.3f}x of TFLite Micro's arena, planned arena "
              f"{r['planned arena'] / r['sum of activations']:.3f}x of all activations; int8 weight+bias bytes "
              f"{r['weights']:,}")
    print("TFLite Micro's flash is the .tflite file alone: its interpreter and kernels add code on the device "
          "that is not counted here.")


if __name__ == "__main__":
    main()
