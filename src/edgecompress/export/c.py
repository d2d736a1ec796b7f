"""C export for microcontrollers: a self-contained C99 library from the integer graph.

``export_c(graph, dir)`` writes ``NAME.h`` / ``NAME.c`` (weights as ``const`` arrays, one static arena
whose size comes from the lifetime plan, no malloc), the integer kernels ``ec_kernels.c/.h`` and a test
harness ``NAME_test.c`` that runs the model on embedded inputs and prints the int8 outputs. The API is
two functions::

    void NAME_init(void);
    int  NAME_run(const int8_t *input, int8_t *output);   /* int8 NHWC in, int8 out; returns 0 */

The rest of this module builds that library with the host ``gcc`` or ``arm-none-eabi-gcc`` for a
Cortex-M target, runs it (natively or under ``qemu-system-arm`` with semihosting) and reads code and
data sizes with ``arm-none-eabi-size``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .. import args
from ..errors import ArtifactError
from .cformats import Encoded, choose, resolve
from .ir import ArenaPlan, Graph, Op, act_range, plan_arena

log = logging.getLogger(__name__)

KERNEL_FILES = ("ec_kernels.c", "ec_kernels.h")
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror")


@dataclass(frozen=True)
class Target:
    """A Cortex-M core, the flags that build for it and the QEMU machine that runs it."""

    cpu: str
    flags: tuple[str, ...]
    machine: str
    flash: tuple[int, int]  # (origin, length) of the code/const region on the QEMU machine
    ram: tuple[int, int]


TARGETS: dict[str, Target] = {
    # MPS2 AN386: Cortex-M4, 4 MB SSRAM at 0x0 for code (vectors first), 4 MB at 0x20000000 for data.
    "cortex-m4": Target("cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"), "mps2-an386",
                        (0x00000400, (4 << 20) - 0x400), (0x20000000, 4 << 20)),
    # MPS2 AN500: Cortex-M7, the same memory map as AN386.
    "cortex-m7": Target("cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=soft"), "mps2-an500",
                        (0x00000400, (4 << 20) - 0x400), (0x20000000, 4 << 20)),
    # BBC micro:bit (nRF51822): Cortex-M0, 256 KB flash at 0x0, 16 KB RAM at 0x20000000. A Cortex-M0+
    # (RP2040) build runs there too: both are Armv6-M with the same instructions.
    "cortex-m0": Target("cortex-m0", ("-mcpu=cortex-m0", "-mthumb", "-mfloat-abi=soft"), "microbit",
                        (0x00000400, (256 << 10) - 0x400), (0x20000000, 16 << 10)),
    "cortex-m0plus": Target("cortex-m0plus", ("-mcpu=cortex-m0plus", "-mthumb", "-mfloat-abi=soft"), "microbit",
                            (0x00000400, (256 << 10) - 0x400), (0x20000000, 16 << 10)),
    # MPS3 AN547: Cortex-M55 (Helium); vectors in the ITCM at 0x0, code in the 2 MB SRAM at
    # 0x01000000, data in the DTCM at 0x20000000.
    "cortex-m55": Target("cortex-m55", ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"), "mps3-an547",
                         (0x01000000, 2 << 20), (0x20000000, 512 << 10)),
}


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


def ident(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else f"l_{s}"


def _array(ctype: str, name: str, values: np.ndarray, per_line: int = 24) -> str:
    flat = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(flat[i:i + per_line]) for i in range(0, len(flat), per_line)] or ["0"]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{max(len(flat), 1)}] = {{\n    {body}\n}};\n"


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
    out = [_array(ctype, f"{name}{suffix}", values) for suffix, (ctype, values) in e.arrays.items()]
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


def config_header(g: Graph, formats: dict[str, Encoded]) -> str:
    """``ec_config.h``: which kernels the model calls (the others are not compiled)."""
    lines = ["/* generated by edgecompress: the kernels this model calls (see ec_kernels.h) */",
             "#ifndef EC_CONFIG_H", "#define EC_CONFIG_H"]
    return "\n".join(lines + [f"#define {m} 1" for m in kernels_used(g, formats)] + ["#endif", ""])


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
            decls.append(_array("int8_t", f"{v}_w", op.qweight) if dense else _weights_decl(e, v))
            decls.append(_array("int32_t", f"{v}_b", op.qbias))
            one = slice(None) if per_channel(op) else slice(0, 1)  # one multiplier and shift for all channels
            decls.append(_array("int32_t", f"{v}_m", op.multiplier.reshape(-1)[one]))
            decls.append(_array("int8_t", f"{v}_s", op.shift.reshape(-1)[one]))
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
            decls.append(_array("int8_t", f"{v}_t", op.table))
            calls.append(f"    ec_lut({g.tensors[op.output].size}, {v}_t, {at(op.inputs[0])}, {at(op.output)});")
        elif op.kind == "gather":
            ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
            decls.append(_array("int16_t", f"{v}_i", op.index))
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


CAL_LOOPS = 100_000  # iterations of the two-instruction calibration loop
_COUNTER = f"""
#ifdef EC_COUNT_INSTRUCTIONS
/* SysTick counts down from 2^24 - 1 on the processor clock; start-up counts its wraps. */
#define EC_SYST ((volatile uint32_t *)0xE000E010u)
extern volatile uint32_t ec_systick_wraps;
static uint32_t ec_ticks(void) {{
    uint32_t w, v;
    do {{ w = ec_systick_wraps; v = EC_SYST[2]; }} while (w != ec_systick_wraps);
    return (w << 24) + (0xFFFFFFu - v);
}}
static void ec_calibrate(void) {{
    uint32_t n = {CAL_LOOPS}u, t;
    EC_SYST[1] = 0xFFFFFFu; EC_SYST[2] = 0; EC_SYST[0] = 7u; /* processor clock, interrupt, enable */
    while (EC_SYST[2] == 0) {{ }} /* until the first reload */
    t = ec_ticks();
#if __ARM_ARCH_ISA_THUMB == 1 /* Thumb-1 inline assembly is in divided syntax: sub sets the flags */
    __asm__ volatile("1: sub %0, #1\\n bne 1b" : "+l"(n) : : "cc");
#else
    __asm__ volatile("1: subs %0, %0, #1\\n bne 1b" : "+l"(n) : : "cc");
#endif
    printf("# calibration %lu ticks for {2 * CAL_LOOPS} instructions\\n", (unsigned long)(ec_ticks() - t));
}}
#define EC_CALIBRATE() ec_calibrate()
#define EC_TICK(t) uint32_t t = ec_ticks()
#define EC_TOCK(t) printf("# inference %lu ticks\\n", (unsigned long)(ec_ticks() - t))
#else
#define EC_CALIBRATE() ((void)0)
#define EC_TICK(t) ((void)0)
#define EC_TOCK(t) ((void)0)
#endif
"""


def _harness(name: str, inputs: np.ndarray, expected: np.ndarray | None) -> str:
    N = name.upper()
    n = len(inputs)
    if expected is None:
        check, exp_decl = "", ""
    else:
        exp_decl = _array("int8_t", "ec_test_expected", expected)
        check = f"""            if (out[j] != ec_test_expected[i * {N}_OUTPUT_SIZE + j]) ++mismatches;\n"""
    return f"""/* Test harness generated by edgecompress: runs {name} on {n} embedded inputs, prints the
 * int8 outputs (one line per input) and, with expected outputs embedded, returns the number of
 * values that differ from the integer reference. Built with EC_COUNT_INSTRUCTIONS for a Cortex-M
 * under QEMU -icount shift=0, it also prints the SysTick ticks of each inference and of a loop of
 * {2 * CAL_LOOPS} instructions, whose ratio gives instructions per inference. */
#include <stdio.h>
#include <stdint.h>
#include "{name}.h"
{_COUNTER}
{_array("int8_t", "ec_test_inputs", inputs)}{exp_decl}
int main(void) {{
    int8_t out[{N}_OUTPUT_SIZE];
    int i, j, mismatches = 0;
    {name}_init();
    EC_CALIBRATE();
    for (i = 0; i < {n}; ++i) {{
        EC_TICK(t0);
        {name}_run(ec_test_inputs + i * {N}_INPUT_SIZE, out);
        EC_TOCK(t0);
        for (j = 0; j < {N}_OUTPUT_SIZE; ++j) {{
            printf(j + 1 < {N}_OUTPUT_SIZE ? "%d " : "%d\\n", out[j]);
{check}        }}
    }}
    return mismatches;
}}
"""


def export_c(g: Graph, out_dir: str | os.PathLike, *, name: str = "model",
             test_inputs: np.ndarray | None = None, expected: np.ndarray | None = None,
             weight_format: str | dict[str, str] = "auto") -> CExport:
    """Write the C library for integer graph ``g`` into ``out_dir`` (and the harness when inputs are given).

    ``weight_format``: ``auto`` (each layer's smallest format), one format for every layer, or
    ``{layer: format}`` (other layers ``auto``); see ``cformats``."""
    from ..files import write_atomic

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
    for fname, text in ((f"{name}.h", header), (f"{name}.c", source), ("ec_config.h", config_header(g, formats))):
        files.append(write_atomic(out / fname, lambda p, t=text: p.write_text(t)))
    for k in KERNEL_FILES:
        text = resources.files(__package__).joinpath("c", k).read_text()
        files.append(write_atomic(out / k, lambda p, t=text: p.write_text(t)))
    exp = CExport(out, name, g, plan, files, formats)
    if test_inputs is not None:
        write_harness(exp, test_inputs, expected=expected)
    return exp


def export_model(model, task, out_dir: str | os.PathLike, *, name: str = "model", n_tests: int = 8,
                 weight_format: str | dict[str, str] = "auto") -> CExport:
    """Lower ``model`` (reading its quantization spec; calibrating what it lacks) and write the C library
    with a harness over the first ``n_tests`` test inputs and their expected outputs; ``weight_format``
    as ``export_c``'s; ``task`` is a Task or a task name."""
    import torch

    from ..techniques.ensemble import Ensemble
    from .ir import lower_task, run_int

    args.model("c.export_model", model)
    args.path("c.export_model", out_dir, "out_dir")
    task = args.task("c.export_model", task)
    if isinstance(model, Ensemble):  # its members one after another in one arena (see c_ensemble)
        from .c_ensemble import export_ensemble

        return export_ensemble(model, task, out_dir, name=name, n_tests=n_tests, weight_format=weight_format)
    g = lower_task(model, task, "c")
    x = torch.cat([xb for xb, _ in task.eval_data])[:n_tests]
    q = g.quantize_input(x)
    return export_c(g, out_dir, name=name, test_inputs=q, expected=run_int(g, q), weight_format=weight_format)


def write_harness(exp: CExport, inputs: np.ndarray, suffix: str = "", expected: np.ndarray | None = None) -> Path:
    from ..files import write_atomic

    inputs = np.asarray(inputs, dtype=np.int8).reshape(len(inputs), -1)
    path = exp.dir / f"{exp.name}_test{suffix}.c"
    write_atomic(path, lambda p: p.write_text(_harness(exp.name, inputs, expected)))
    if path not in exp.files:
        exp.files.append(path)
    return path


# ---- building and running -------------------------------------------------------------------

def _run(cmd: list[str], what: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        raise ArtifactError(f"{what}: {cmd[0]} is not installed (make toolchain installs it)") from None
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        raise ArtifactError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:400]}")
    return r


def _parse(stdout: str, n_out: int) -> np.ndarray:
    rows = [list(map(int, line.split())) for line in stdout.splitlines() if line.strip() and line[0] != "#"]
    if any(len(r) != n_out for r in rows):
        raise ArtifactError(f"test harness printed a line without {n_out} values")
    return np.array(rows, dtype=np.int8).reshape(-1, n_out)


def build_host(exp: CExport, inputs: np.ndarray, cc: str = "gcc") -> Path:
    """Compile the library and a harness over ``inputs`` for this machine; returns the executable."""
    harness = write_harness(exp, inputs, "_host")
    exe = exp.dir / f"{exp.name}_host"
    _run([cc, *CFLAGS, "-o", str(exe), str(harness), *map(str, exp.sources), f"-I{exp.dir}"], "host build")
    return exe


def run_host(exp: CExport, inputs: np.ndarray, cc: str = "gcc") -> np.ndarray:
    """int8 outputs of the C library compiled for this machine, one row per input."""
    exe = build_host(exp, inputs, cc)
    return _parse(_run([str(exe)], "host run").stdout, exp.graph.tensors[exp.graph.output].size)


_STARTUP = """/* Minimal Cortex-M start-up for QEMU with semihosting: vector table, .bss, exit code. */
#include <stdlib.h>
#include <string.h>
extern int main(void);
extern void initialise_monitor_handles(void);
extern char __bss_start__[], __bss_end__[], __stack_top[];
void ec_reset(void);
void ec_fault(void);
void ec_systick(void);
volatile unsigned ec_systick_wraps;
__attribute__((section(".vectors"), used)) static void (*const ec_vectors[16])(void) = {
    (void (*)(void))__stack_top, ec_reset, ec_fault, ec_fault, ec_fault, ec_fault, ec_fault,
    0, 0, 0, 0, ec_fault, ec_fault, 0, ec_fault, ec_systick};
void ec_fault(void) { exit(99); }
void ec_systick(void) { ++ec_systick_wraps; }
void ec_reset(void) {
#if defined(__ARM_FP)
    *(volatile unsigned *)0xE000ED88 |= 0xFu << 20; /* enable the FPU (CPACR) */
#endif
    memset(__bss_start__, 0, (size_t)(__bss_end__ - __bss_start__));
    initialise_monitor_handles();
    exit(main());
}
"""

_LINKER = """ENTRY(ec_reset)
MEMORY {{
  VEC (rx) : ORIGIN = 0x0, LENGTH = 0x400
  FLASH (rx) : ORIGIN = {fo:#x}, LENGTH = {fl:#x}
  RAM (rwx) : ORIGIN = {ro:#x}, LENGTH = {rl:#x}
}}
SECTIONS {{
  .vectors : {{ KEEP(*(.vectors)) }} > VEC
  .text : {{ *(.text*) *(.rodata*) KEEP(*(.init)) KEEP(*(.fini)) }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
  .data : {{ *(.data*) }} > RAM
  .bss (NOLOAD) : {{ __bss_start__ = .; *(.bss*) *(COMMON) . = ALIGN(8); __bss_end__ = .; }} > RAM
  end = .;
  __end__ = .;
  __stack_top = ORIGIN(RAM) + LENGTH(RAM);
}}
"""


def build_arm(exp: CExport, inputs: np.ndarray, target: str = "cortex-m4", count: bool = False) -> Path:
    """Cross-compile the library and a harness over ``inputs`` with arm-none-eabi-gcc; returns the ELF.
    With ``count`` the harness reads SysTick around each inference (see ``count_instructions``)."""
    t = TARGETS[target]
    harness = write_harness(exp, inputs, "_arm")
    bdir = exp.dir / f"build-{target}{'-count' if count else ''}"
    bdir.mkdir(exist_ok=True)
    (bdir / "startup.c").write_text(_STARTUP)
    (bdir / "link.ld").write_text(_LINKER.format(fo=t.flash[0], fl=t.flash[1], ro=t.ram[0], rl=t.ram[1]))
    elf = bdir / f"{exp.name}.elf"
    objs = []
    for src in [*exp.sources, harness, bdir / "startup.c"]:
        obj = bdir / (src.stem + ".o")
        std = CFLAGS if src.name != "startup.c" else ("-std=gnu99", "-O2", "-Wall")  # start-up code is GNU C
        std = (*std, "-DEC_COUNT_INSTRUCTIONS") if count and src == harness else std
        _run(["arm-none-eabi-gcc", *std, "-Os", *t.flags, "-ffunction-sections", "-fdata-sections",
              f"-I{exp.dir}", "-c", str(src), "-o", str(obj)], f"{target} compile {src.name}")
        objs.append(obj)
    _run(["arm-none-eabi-gcc", *t.flags, "--specs=rdimon.specs", "-nostartfiles", "-Wl,--gc-sections",
          f"-T{bdir / 'link.ld'}", "-o", str(elf), *map(str, objs), "-lc", "-lrdimon"], f"{target} link")
    return elf


def _qemu(elf: Path, target: str, timeout: float, icount: bool = False) -> str:
    t = TARGETS[target]
    r = _run(["qemu-system-arm", "-M", t.machine, "-nographic", "-monitor", "none", "-serial", "none",
              *(("-icount", "shift=0") if icount else ()),
              "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)],
             f"qemu {t.machine}", timeout=timeout, stdin=subprocess.DEVNULL)
    return r.stdout


def run_qemu(exp: CExport, elf: Path, target: str = "cortex-m4", timeout: float = 120) -> np.ndarray:
    """Run an ELF from ``build_arm`` under qemu-system-arm with semihosting; int8 outputs per input."""
    return _parse(_qemu(elf, target, timeout), exp.graph.tensors[exp.graph.output].size)


@dataclass
class Count:
    """Instructions the model executed per inference under ``qemu-system-arm -icount shift=0``."""

    target: str
    machine: str
    outputs: np.ndarray  # int8, one row per input
    instructions: list[int]  # per inference
    ticks: list[int]  # SysTick ticks per inference
    instructions_per_tick: float  # from the calibration loop (40 on mps2-an386)

    @property
    def per_inference(self) -> int:
        return int(np.median(self.instructions))


def count_instructions(exp: CExport, inputs: np.ndarray, target: str = "cortex-m4", timeout: float = 300) -> Count:
    """Run the library under QEMU with ``-icount shift=0`` and count the instructions of each inference.

    With ``-icount shift=0`` QEMU advances its virtual clock 1 ns per executed instruction, so SysTick
    (on the processor clock) ticks once per fixed number of instructions: 40 on mps2-an386's 25 MHz.
    The harness reads SysTick around each ``run`` call and around a loop of known length (``subs``,
    ``bne``: two instructions per iteration), whose ticks give that number on every machine; the count
    is exact to one tick (plus the few instructions of the SysTick reads)."""
    elf = build_arm(exp, inputs, target, count=True)
    out = _qemu(elf, target, timeout, icount=True)
    cal = re.search(r"# calibration (\d+) ticks for (\d+) instructions", out)
    ticks = [int(v) for v in re.findall(r"# inference (\d+) ticks", out)]
    if cal is None or len(ticks) != len(inputs) or int(cal.group(1)) == 0:
        raise ArtifactError(f"qemu {TARGETS[target].machine}: the harness printed no instruction counts "
                            "(SysTick not running under -icount?)")
    per_tick = int(cal.group(2)) / int(cal.group(1))
    return Count(target, TARGETS[target].machine, _parse(out, exp.graph.tensors[exp.graph.output].size),
                 [int(round(t * per_tick)) for t in ticks], ticks, per_tick)


@dataclass
class ArmSize:
    target: str
    text: int  # code and const data (flash)
    data: int  # initialised data (flash and RAM)
    bss: int  # zeroed RAM (the arena)
    kernels: int = 0  # of ``text``: the kernels' code (ec_kernels.o); the rest is the model's weights and calls

    @property
    def flash(self) -> int:
        return self.text + self.data

    @property
    def ram(self) -> int:
        return self.data + self.bss


def arm_size(exp: CExport, target: str = "cortex-m4") -> ArmSize:
    """Flash and static RAM of the model library alone (model + kernels objects, no harness or libc),
    compiled with -Os for ``target``, as ``arm-none-eabi-size`` reports them."""
    t = TARGETS[target]
    bdir = exp.dir / f"build-{target}"
    bdir.mkdir(exist_ok=True)
    objs = []
    for src in exp.sources:
        obj = bdir / (src.stem + ".o")
        _run(["arm-none-eabi-gcc", *CFLAGS, "-Os", *t.flags, f"-I{exp.dir}", "-c", str(src), "-o", str(obj)],
             f"{target} compile {src.name}")
        objs.append(str(obj))
    r = _run(["arm-none-eabi-size", "-t", *objs], "arm-none-eabi-size")
    lines = [line.split() for line in r.stdout.strip().splitlines()[1:]]
    total = lines[-1]
    kernels = next(int(v[0]) + int(v[1]) for v in lines if v[-1].endswith("ec_kernels.o"))
    return ArmSize(target, int(total[0]), int(total[1]), int(total[2]), kernels)


def have_toolchain() -> bool:
    return all(shutil.which(x) for x in ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"))
