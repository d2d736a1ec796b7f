"""C export for microcontrollers: a self-contained C99 library from the integer graph.

``export_c(graph, dir)`` writes ``NAME.h`` / ``NAME.c`` (weights as ``const`` arrays, one static arena
whose size comes from the lifetime plan, no malloc), the integer kernels ``ec_kernels.c/.h`` and a test
harness ``NAME_test.c`` that runs the model on embedded inputs and prints the int8 outputs. The API is
two functions::

    void NAME_init(void);
    int  NAME_run(const int8_t *input, int8_t *output);   /* int8 NHWC in, int8 out; returns 0 */

``build_host``/``run_host`` and ``build_arm``/``run_qemu``/``count_instructions``/``arm_size`` build it
with the shared toolchain (``toolchain``) and run it natively or under ``qemu-system-arm``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ...errors import ArtifactError
from ...files import write_atomic
from ..cformats import Encoded, choose, resolve
from ..ir import ArenaPlan, Graph, Op, act_range, plan_arena
from .harness import parse_outputs, write_harness
from .literals import array, ident
from .toolchain import (TARGETS, ArmSize, Count, arm_size_of, build_elf, compile_host, qemu, read_counts,
                        run_tool)

log = logging.getLogger(__name__)

KERNEL_FILES = ("ec_kernels.c", "ec_kernels.h")


def kernel_texts() -> list[tuple[str, str]]:
    """The kernels' file names and sources, shipped beside this module."""
    return [(k, resources.files(__package__).joinpath(k).read_text()) for k in KERNEL_FILES]


@dataclass
class CExport:
    dir: Path
    name: str
    graph: Graph
    plan: ArenaPlan
    files: list[Path]
    formats: dict[str, Encoded] = field(default_factory=dict)  # layer -> how its weights are stored

    def format_lines(self) -> list[str]:
        """One line per weighted layer: its weight format, bytes and why."""
        return [f"{layer}: {e.describe()}, {e.nbytes:,} B of weights ({e.reason})" for layer, e in self.formats.items()]

    @property
    def sources(self) -> list[Path]:
        return [self.dir / f"{self.name}.c", self.dir / "ec_kernels.c"]

    @property
    def artifact_bytes(self) -> int:
        """Bytes of the generated library sources (not the flash size: see ``arm_size``)."""
        return sum(p.stat().st_size for p in self.files if p.suffix in (".c", ".h") and "_test" not in p.name)


def per_channel(op: Op) -> bool:
    """Whether the layer's requantization differs between output channels (else one multiplier and
    shift serve every channel: a layer with one weight scale, as weight sharing leaves)."""
    return bool(np.any(op.multiplier != op.multiplier.reshape(-1)[0]) or np.any(op.shift != op.shift.reshape(-1)[0]))


def _conv_struct(op: Op, g: Graph, name: str, dense: bool) -> str:
    ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
    lo, hi = act_range(op, to.q)
    ih, iw, ic = ti.shape
    oh, ow, oc = to.shape
    groups = op.groups if op.kind == "conv" or dense else ic  # compressed depthwise runs as groups = ic
    f = [ih, iw, ic, oh, ow, oc, op.kernel[0], op.kernel[1], op.stride[0], op.stride[1], op.pad[0], op.pad[1],
         groups, ti.q.zero_point, to.q.zero_point, lo, hi, int(per_channel(op))]
    w = f"{name}_w, {name}_b, {name}_m, {name}_s, 0" if dense else f"0, {name}_b, {name}_m, {name}_s, &{name}_f"
    return f"static const ec_conv_t {name}_p = {{{', '.join(map(str, f))}, {w}}};\n"


def _fc_struct(op: Op, g: Graph, name: str, dense: bool) -> str:
    ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
    lo, hi = act_range(op, to.q)
    f = [ti.size, to.size, ti.q.zero_point, to.q.zero_point, lo, hi, int(per_channel(op))]
    w = f"{name}_w, {name}_b, {name}_m, {name}_s, 0" if dense else f"0, {name}_b, {name}_m, {name}_s, &{name}_f"
    return f"static const ec_fc_t {name}_p = {{{', '.join(map(str, f))}, {w}}};\n"


_FORMAT_ENUM = {"int4": "EC_INT4", "codebook": "EC_CODEBOOK", "channel-codebook": "EC_CODEBOOK",
                "sparse": "EC_SPARSE", "sparse-codebook": "EC_SPARSE_CODEBOOK"}


def _weights_decl(e: Encoded, name: str) -> str:
    """The arrays of a compressed weight set and its ``ec_weights_t``."""
    out = [array(ctype, f"{name}{suffix}", values) for suffix, (ctype, values) in e.arrays.items()]
    ref = {s: f"{name}{s}" if s in e.arrays else "0" for s in ("_wv", "_wq", "_wt", "_wm", "_wg", "_wn")}
    run_bits = 4 if e.positions == "runs4" else 8
    out.append(f"static const ec_weights_t {name}_f = {{{_FORMAT_ENUM[e.format]}, {e.bits}, {run_bits}, {e.block}, "
               f"{', '.join(ref.values())}, {e.table_stride}}};\n")
    return "".join(out)


def _kernel(op: Op, e: Encoded) -> str:
    base = "conv" if op.kind in ("conv", "dwconv") else "fc"
    if e.format == "dense":
        return f"ec_{op.kind}"
    return f"ec_{base}_{'sparse' if e.format.startswith('sparse') else 'packed'}"


def kernels_used(g: Graph, formats: dict[str, Encoded]) -> list[str]:
    """The ``ec_config.h`` macros of the kernels (and compressed-weight variants) the model calls: only
    those are compiled, so flash holds no kernel the model does not run."""
    used = set()
    for op in g.ops:
        e = formats.get(op.layer) or Encoded("dense")
        if op.kind in ("conv", "dwconv", "fc"):
            k = _kernel(op, e)[3:]
            used.add(f"EC_USE_{k.upper()}")
            if e.format in ("int4", "codebook", "channel-codebook"):
                used |= {"EC_PACKED_KERNELS", "EC_PACKED_INT4" if e.format == "int4" else "EC_PACKED_CODEBOOK"}
                if e.format == "channel-codebook":  # a table per output row
                    used.add("EC_PACKED_CHANNEL")
            elif e.format != "dense":
                used |= {"EC_SPARSE_KERNELS", "EC_SPARSE_" + {"bitmask": "MASK"}.get(e.positions, e.positions.upper()),
                         "EC_SPARSE_TABLE" if "codebook" in e.format else "EC_SPARSE_VALUES"}
        elif op.kind in ("maxpool", "avgpool", "add", "mul", "lut", "concat", "rescale", "gather", "relu"):
            used.add(f"EC_USE_{op.kind.upper()}")
    return sorted(used)


def config_header(used: list[str], what: str = "the kernels this model calls") -> str:
    """``ec_config.h``: the kernel macros ``used`` (``kernels_used``); the other kernels are not compiled."""
    lines = [f"/* generated by edgecompress: {what} (see ec_kernels.h) */", "#ifndef EC_CONFIG_H",
             "#define EC_CONFIG_H"]
    return "\n".join(lines + [f"#define {m} 1" for m in used] + ["#endif", ""])


def _pool_struct(op: Op, g: Graph, name: str) -> str:
    ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
    f = [ti.shape[0], ti.shape[1], ti.shape[2], to.shape[0], to.shape[1], op.kernel[0], op.kernel[1],
         op.stride[0], op.stride[1], op.pad[0], op.pad[1], -128, 127]
    return f"static const ec_pool_t {name}_p = {{{', '.join(map(str, f))}}};\n"


def _add_struct(op: Op, g: Graph, name: str) -> str:
    ta, tb, to = (g.tensors[op.inputs[0]], g.tensors[op.inputs[1]], g.tensors[op.output])
    lo, hi = act_range(op, to.q)
    m, s = op.multiplier.tolist(), op.shift.tolist()
    f = [to.size, ta.q.zero_point, tb.q.zero_point, to.q.zero_point, lo, hi, *m, *s]
    return f"static const ec_add_t {name}_p = {{{', '.join(map(str, f))}}};\n"


def _mul_struct(op: Op, g: Graph, name: str) -> str:
    ta, tb, to = (g.tensors[op.inputs[0]], g.tensors[op.inputs[1]], g.tensors[op.output])
    lo, hi = act_range(op, to.q)
    c = ta.shape[-1]
    f = [ta.size // c, c, ta.q.zero_point, tb.q.zero_point, to.q.zero_point, lo, hi, int(tb.size != ta.size),
         int(op.multiplier[0]), int(op.shift[0])]
    return f"static const ec_mul_t {name}_p = {{{', '.join(map(str, f))}}};\n"


def generate(g: Graph, plan: ArenaPlan, name: str, formats: dict[str, Encoded] | None = None,
             shared: str | None = None) -> tuple[str, str]:
    """(header, source) of the model library; ``formats`` gives each weighted layer's weight format
    (default dense). ``shared``: the name of a library (an ensemble's) whose header declares
    ``{shared}_arena``, which this model then uses instead of an arena of its own."""
    N = name.upper()
    tin, tout = g.tensors[g.input], g.tensors[g.output]
    formats = formats or {}

    def fmt_of(op: Op) -> str:
        return f", {formats[op.layer].describe()} weights" if op.layer in formats else ""

    layers = "\n".join(f" *   {op.layer}: {op.kind}{' + relu' if op.relu else ''}{fmt_of(op)} -> "
                       f"{list(g.tensors[op.output].shape)}" for op in g.ops)
    header = f"""/* {name}: int8 model generated by edgecompress. Input and output are int8, NHWC.
 * real = scale * (q - zero_point). Layers:
{layers}
 */
#ifndef {N}_H
#define {N}_H

#include <stdint.h>

#define {N}_INPUT_SIZE {tin.size}
#define {N}_OUTPUT_SIZE {tout.size}
#define {N}_ARENA_SIZE {plan.peak}
#define {N}_INPUT_SCALE {tin.q.scale!r}f
#define {N}_INPUT_ZERO_POINT ({tin.q.zero_point})
#define {N}_OUTPUT_SCALE {tout.q.scale!r}f
#define {N}_OUTPUT_ZERO_POINT ({tout.q.zero_point})

/* Clears the activation arena. */
void {name}_init(void);
/* Runs the model on {N}_INPUT_SIZE int8 values; writes {N}_OUTPUT_SIZE int8 values. Returns 0. */
int {name}_run(const int8_t *input, int8_t *output);

#endif
"""
    decls, calls = [], []

    def at(tensor: str) -> str:
        return f"(ec_arena.bytes + {plan.offsets[plan.buffer_of[tensor]]})"

    for op in g.ops:
        v = ident(op.layer)
        if op.kind in ("conv", "dwconv", "fc"):
            e = formats.get(op.layer) or Encoded("dense")
            dense = e.format == "dense"
            decls.append(array("int8_t", f"{v}_w", op.qweight) if dense else _weights_decl(e, v))
            decls.append(array("int32_t", f"{v}_b", op.qbias))
            one = slice(None) if per_channel(op) else slice(0, 1)  # one multiplier and shift for all channels
            decls.append(array("int32_t", f"{v}_m", op.multiplier.reshape(-1)[one]))
            decls.append(array("int8_t", f"{v}_s", op.shift.reshape(-1)[one]))
            decls.append(_fc_struct(op, g, v, dense) if op.kind == "fc" else _conv_struct(op, g, v, dense))
            calls.append(f"    {_kernel(op, e)}(&{v}_p, {at(op.inputs[0])}, {at(op.output)});")
        elif op.kind in ("maxpool", "avgpool"):
            decls.append(_pool_struct(op, g, v))
            calls.append(f"    ec_{op.kind}(&{v}_p, {at(op.inputs[0])}, {at(op.output)});")
        elif op.kind == "add":
            decls.append(_add_struct(op, g, v))
            calls.append(f"    ec_add(&{v}_p, {at(op.inputs[0])}, {at(op.inputs[1])}, {at(op.output)});")
        elif op.kind == "mul":
            decls.append(_mul_struct(op, g, v))
            calls.append(f"    ec_mul(&{v}_p, {at(op.inputs[0])}, {at(op.inputs[1])}, {at(op.output)});")
        elif op.kind == "lut":
            decls.append(array("int8_t", f"{v}_t", op.table))
            calls.append(f"    ec_lut({g.tensors[op.output].size}, {v}_t, {at(op.inputs[0])}, {at(op.output)});")
        elif op.kind == "gather":
            ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
            decls.append(array("int16_t", f"{v}_i", op.index))
            calls.append(f"    ec_gather({to.size // to.shape[-1]}, {ti.shape[-1]}, {to.shape[-1]}, {v}_i, "
                         f"{at(op.inputs[0])}, {at(op.output)});")
        elif op.kind == "rescale":
            ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
            calls.append(f"    ec_rescale({to.size}, {ti.q.zero_point}, {to.q.zero_point}, {int(op.multiplier[0])}, "
                         f"{int(op.shift[0])}, {at(op.inputs[0])}, {at(op.output)});")
        elif op.kind == "concat":
            to = g.tensors[op.output]
            c0 = 0
            for i in op.inputs:
                c_in = g.tensors[i].shape[-1]
                calls.append(f"    ec_concat({to.size // to.shape[-1]}, {c_in}, {to.shape[-1]}, {c0}, {at(i)}, "
                             f"{at(op.output)});")
                c0 += c_in
        elif op.kind == "relu":
            calls.append(f"    ec_relu({g.tensors[op.output].size}, {g.tensors[op.inputs[0]].q.zero_point}, "
                         f"{at(op.inputs[0])}, {at(op.output)});")
        elif op.kind == "reshape":
            calls.append(f"    /* {op.layer}: reshape, in place */")
    words = max(1, plan.peak // 4)
    arena = (f"static union {{ int32_t align; int8_t bytes[{words * 4}]; }} ec_arena;" if shared is None else
             f'#include "{shared}.h"\n#define ec_arena {shared}_arena /* shared by the members */')
    source = f"""/* {name}: generated by edgecompress. Weights are const (flash); activations live in one
 * static arena of {plan.peak} bytes planned from tensor lifetimes (the sum of all activations is
 * {plan.total} bytes). */
#include <string.h>
#include "ec_kernels.h"
#include "{name}.h"

{arena}

{"".join(decls)}
void {name}_init(void) {{
    memset(ec_arena.bytes, 0, sizeof ec_arena.bytes);
}}

int {name}_run(const int8_t *input, int8_t *output) {{
    memcpy({at(g.input)}, input, {tin.size});
{chr(10).join(calls)}
    memcpy(output, {at(g.output)}, {tout.size});
    return 0;
}}
"""
    return header, source


def export_c(g: Graph, out_dir: str | os.PathLike, *, name: str = "model",
             test_inputs: np.ndarray | None = None, expected: np.ndarray | None = None,
             weight_format: str | dict[str, str] = "auto") -> CExport:
    """Write the C library for integer graph ``g`` into ``out_dir`` (and the harness when inputs are given).

    ``weight_format``: ``auto`` (each layer's smallest format), one format for every layer, or
    ``{layer: format}`` (other layers ``auto``); see ``cformats``."""
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ArtifactError(f"name must be a C identifier; got {name!r}")
    weighted = [op for op in g.ops if op.qweight is not None]
    wanted = resolve(weight_format, [op.layer for op in weighted])
    formats = {op.layer: choose(op, wanted[op.layer]) for op in weighted}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_arena(g)
    header, source = generate(g, plan, name, formats)
    files = []
    for fname, text in ((f"{name}.h", header), (f"{name}.c", source), ("ec_config.h", config_header(kernels_used(g, formats)))):
        files.append(write_atomic(out / fname, lambda p, t=text: p.write_text(t)))
    for k, text in kernel_texts():
        files.append(write_atomic(out / k, lambda p, t=text: p.write_text(t)))
    exp = CExport(out, name, g, plan, files, formats)
    if test_inputs is not None:
        write_harness(exp, test_inputs, expected=expected)
    return exp


# ---- building and running one model's library ------------------------------------------------

def _outputs(exp: CExport) -> int:
    return exp.graph.tensors[exp.graph.output].size


def build_host(exp: CExport, inputs: np.ndarray, cc: str = "gcc") -> Path:
    """Compile the library and a harness over ``inputs`` for this machine; returns the executable."""
    return compile_host(exp.dir, exp.name, exp.sources, write_harness(exp, inputs, "_host"), cc=cc)


def run_host(exp: CExport, inputs: np.ndarray, cc: str = "gcc") -> np.ndarray:
    """int8 outputs of the C library compiled for this machine, one row per input."""
    exe = build_host(exp, inputs, cc)
    return parse_outputs(run_tool([str(exe)], "host run").stdout, _outputs(exp))


def build_arm(exp: CExport, inputs: np.ndarray, target: str = "cortex-m4", count: bool = False) -> Path:
    """Cross-compile the library and a harness over ``inputs`` with arm-none-eabi-gcc; returns the ELF.
    With ``count`` the harness reads SysTick around each inference (see ``count_instructions``)."""
    return build_elf(exp.dir, exp.name, exp.sources, write_harness(exp, inputs, "_arm"), target, count)


def run_qemu(exp: CExport, elf: Path, target: str = "cortex-m4", timeout: float = 120) -> np.ndarray:
    """Run an ELF from ``build_arm`` under qemu-system-arm with semihosting; int8 outputs per input."""
    return parse_outputs(qemu(elf, target, timeout), _outputs(exp))


def count_instructions(exp: CExport, inputs: np.ndarray, target: str = "cortex-m4",
                       timeout: float = 300) -> Count:
    """Run the library under QEMU with ``-icount shift=0`` and count the instructions of each inference
    (``toolchain.read_counts``)."""
    out = qemu(build_arm(exp, inputs, target, count=True), target, timeout, icount=True)
    instructions, ticks, per_tick = read_counts(out, len(inputs), target)
    return Count(target, TARGETS[target].machine, parse_outputs(out, _outputs(exp)), instructions, ticks,
                    per_tick)


def arm_size(exp: CExport, target: str = "cortex-m4") -> ArmSize:
    """Flash and static RAM of the model library alone (model + kernels objects, no harness or libc),
    compiled with -Os for ``target``, as ``arm-none-eabi-size`` reports them."""
    return arm_size_of(exp.dir, exp.sources, target)
