"""Apache TVM: our exported ONNX (fp32, or the int8 QDQ graph with the quantize stage's scales)
imported by relax's ONNX frontend, compiled by ``tvm.compile`` and written as a shared library that
TVM's runtime loads (``tvm.runtime.load_module`` + ``relax.VirtualMachine``).

Targets: the host (``llvm``), and for a device profile with ``tvm_target: aarch64`` (``rpi4``) 64-bit
Arm (``AARCH64``, linked with Debian's ``aarch64-linux-gnu-gcc``). A ``.tar`` path writes the compiled
objects without linking them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import args
from ..errors import RecipeError
from ..files import write_atomic
from .onnx import export_onnx

HOST = "llvm"
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
CROSS_CC = "aarch64-linux-gnu-gcc"


def _tvm():
    try:
        import tvm
        from tvm import relax  # noqa: F401
        from tvm.relax.frontend import onnx as _  # noqa: F401
    except ImportError:
        raise RecipeError("export tvm needs Apache TVM: pip install 'edgecompress[tvm]'") from None
    return tvm


def compile_onnx(onnx_path: str | os.PathLike, target: str | dict = HOST):
    """relax's ONNX frontend, then ``tvm.compile`` for ``target``; one line when the frontend refuses."""
    import onnx

    tvm = _tvm()
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=False)
    except Exception as e:  # the frontend raises many kinds of errors for operators it lacks
        raise RecipeError(f"export tvm: TVM's ONNX frontend cannot import {Path(onnx_path).name}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    return tvm.compile(mod, target=tvm.target.Target(target))


def export_library(onnx_path: str | os.PathLike, path: str | os.PathLike, target: str | dict = HOST) -> Path:
    """Compile ``onnx_path`` for ``target`` into ``path`` (a shared library; ``.tar``: the objects)."""
    path = Path(path)
    executable = compile_onnx(onnx_path, target)
    kw = {}
    if target != HOST and path.suffix != ".tar":
        if shutil.which(CROSS_CC) is None:
            raise RecipeError(f"export tvm for aarch64 links with {CROSS_CC}, which is not installed: "
                              "apt-get install gcc-aarch64-linux-gnu")
        from tvm.support import cc
        kw["fcompile"] = cc.cross_compiler(CROSS_CC)

    def write(tmp: Path) -> None:
        out = tmp.with_name(tmp.name + path.suffix)  # TVM picks the format from the suffix
        try:
            executable.export_library(str(out), **kw)
            os.replace(out, tmp)
        finally:
            if out.exists():
                out.unlink()

    return write_atomic(path, write)


def export_model(model: nn.Module, example_input: torch.Tensor, out_dir: str | os.PathLike,
                 target: str | None = None) -> list[Path]:
    """``model.so`` for the host and, for ``target="aarch64"`` (a device profile's ``tvm_target``, e.g.
    rpi4's), ``model-aarch64.so`` too."""
    args.exporter("tvm.export_model", model, example_input, out_dir, "out_dir")
    if target not in (None, "host", "aarch64"):
        raise ValueError(f"tvm.export_model(): target must be 'host', 'aarch64' or None; got {target!r}")
    _tvm()
    cross = target == "aarch64"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, example_input, Path(tmp) / "model.onnx")
        written = [export_library(onnx_path, out_dir / "model.so")]
        if cross:
            written.append(export_library(onnx_path, out_dir / "model-aarch64.so", AARCH64))
    return written


def runner(path: str | os.PathLike, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A host library's ``main`` as a function of a float32 batch. ``threads``: the size of TVM's thread
    pool (one pool for the whole process; by default ``TVM_NUM_THREADS`` or every core)."""
    tvm = _tvm()
    from tvm import relax

    if threads is not None:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: the big cores (all, on a uniform CPU)

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    main = vm["main"]

    def call(x: np.ndarray) -> np.ndarray:
        return main(tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return call
