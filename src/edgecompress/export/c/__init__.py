"""C for microcontrollers: one model's library (``library``), an ensemble's (``ensemble``), the test
harness (``harness``) and the toolchain that builds, runs, sizes and counts both (``toolchain``).
``export_model`` writes either, from a model and its task."""
from __future__ import annotations

import os

from ... import args
from ...primitives.ensemble import Ensemble
from .library import CExport, arm_size, build_arm, count_instructions, export_c, run_host, run_qemu
from .toolchain import CFLAGS, TARGETS, Count, Target, have_toolchain, run_tool

__all__ = ["CFLAGS", "TARGETS", "CExport", "Count", "Target", "arm_size", "build_arm", "count_instructions", "export_c",
           "export_model", "have_toolchain", "run_host", "run_qemu", "run_tool"]


def export_model(model, task, out_dir: str | os.PathLike, *, name: str = "model", n_tests: int = 8,
                 weight_format: str | dict[str, str] = "auto") -> CExport:
    """Lower ``model`` (reading its quantization spec; calibrating what it lacks) and write the C library
    with a harness over the first ``n_tests`` test inputs and their expected outputs; ``weight_format``
    as ``export_c``'s; ``task`` is a Task or a task name."""
    import torch

    from ..ir import lower_task, run_int

    args.model("c.export_model", model)
    args.path("c.export_model", out_dir, "out_dir")
    task = args.task("c.export_model", task)
    if isinstance(model, Ensemble):  # its members one after another in one arena (see ensemble)
        from .ensemble import export_ensemble

        return export_ensemble(model, task, out_dir, name=name, n_tests=n_tests, weight_format=weight_format)
    g = lower_task(model, task, "c")
    x = torch.cat([xb for xb, _ in task.eval_data])[:n_tests]
    q = g.quantize_input(x)
    return export_c(g, out_dir, name=name, test_inputs=q, expected=run_int(g, q), weight_format=weight_format)
