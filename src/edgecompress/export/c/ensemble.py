"""C export of an ensemble: its members run one after another in one shared arena, then the combiner.

``export_ensemble(model, task, dir)`` lowers each member of an ``Ensemble`` to its integer graph and
writes, beside the kernels (``ec_kernels.c/.h``, compiled once for every member):

- ``NAME_m<i>.c/.h``: member ``i`` exactly as ``export_c`` writes a single model, except that its
  activations live in the shared arena ``NAME_arena``;
- ``NAME.c/.h``: the shared arena, as large as the largest member's plan (the members run one at a
  time, so RAM is the largest member's need, not the sum), and the API::

      void NAME_init(void);
      int  NAME_run(const int8_t *input, float *output);   /* int8 NHWC in, NAME_OUTPUT_SIZE floats */
      int  NAME_run_members(const int8_t *input, int8_t *members, float *output);  /* also each
                                                               member's int8 output, member after member */

The input is int8 with member 0's input quantization; a member that takes its input at another
scale or zero point gets it requantized with integer arithmetic (``member_input``, fixed-point
multiplier and shift as every kernel's). Each member's int8 output is bit-exact with the integer
reference (``ir.run_int``) on that input. The combiner works in float32 on the dequantized
member outputs as ``primitives.ensemble.combine_outputs`` does in torch: ``logits`` the mean (the sum in member
order, divided by the count: the same float32 operations as ``reference``, so bit-exact with it);
``average`` and ``weighted`` the log of the (weighted) mean softmax, ``vote`` one vote per member's
argmax plus half the mean probability, ``stack`` the linear combiner on the log-softmax (its weights
as exact float32 literals). Those use ``expf`` and ``logf`` of the C library: they agree with torch
to ``ATOL`` + ``RTOL`` x |value|, not bit for bit (the argmax agrees on every MNIST-1D test input in
the tests). Stack use of ``NAME_run``: members x outputs int8 values and as many floats.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import ArtifactError
from ...files import write_atomic
from ...primitives.fixedpoint import quantize_multiplier, requantize
from ..cformats import choose, resolve
from ..ir import Graph, lower_task, plan_arena, run_int
from .harness import COUNTER, write_test
from .library import CExport, config_header, kernel_texts, kernels_used
from .library import generate as generate_library
from .literals import array
from .toolchain import (TARGETS, ArmSize, Count, arm_size_of, build_elf, compile_host, object_sizes, qemu, read_counts,
                        run_tool)

ATOL, RTOL = 1e-5, 1e-5  # combined float outputs against torch's combine_outputs (not logits: exact)


@dataclass
class EnsembleExport:
    dir: Path
    name: str
    members: list[CExport]  # each member's library (its graph, arena plan and weight formats)
    combine: str
    arena: int  # bytes of the shared arena: the largest member's plan
    files: list[Path] = field(default_factory=list)

    @property
    def sources(self) -> list[Path]:
        return [self.dir / f"{m.name}.c" for m in self.members] + [self.dir / f"{self.name}.c",
                                                                   self.dir / "ec_kernels.c"]

    @property
    def classes(self) -> int:
        g = self.members[0].graph
        return g.tensors[g.output].size

    @property
    def graph(self) -> Graph:
        """Member 0's graph: the input every member takes (``quantize_input``)."""
        return self.members[0].graph


def _flt(v: float) -> str:
    """A float32 value as an exact C literal."""
    v = float(np.float32(v))
    return f"{v.hex()}f" if v != 0 else "0.0f"


def _floats(name: str, values: np.ndarray) -> str:
    flat = [_flt(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]
    body = ",\n    ".join(", ".join(flat[i:i + 8]) for i in range(0, len(flat), 8))
    return f"static const float {name}[{len(flat)}] = {{\n    {body}\n}};\n"


def _combiner(combine: str, n: int, k: int, weights: np.ndarray | None, stack: tuple[np.ndarray, np.ndarray] | None
              ) -> tuple[str, str]:
    """(declarations, body) of the combiner: ``d`` holds the n x k dequantized outputs, ``out`` gets k floats."""
    if combine == "logits":
        return "", f"""    for (j = 0; j < {k}; ++j) {{
        float s = d[j];
        for (i = 1; i < {n}; ++i) s += d[i * {k} + j];
        out[j] = s / {n}.0f;
    }}"""
    softmax = f"""    for (i = 0; i < {n}; ++i) {{ /* d[i] -> softmax (or log-softmax), in place */
        float *v = d + i * {k}, m = v[0], s = 0.0f;
        for (j = 1; j < {k}; ++j) if (v[j] > m) m = v[j];
        for (j = 0; j < {k}; ++j) s += expf(v[j] - m);
        for (j = 0; j < {k}; ++j) v[j] = {{SOFTMAX}};
    }}
"""
    if combine == "stack":
        w, b = stack
        decls = _floats("ec_stack_w", w) + _floats("ec_stack_b", b)
        return decls, softmax.replace("{SOFTMAX}", "(v[j] - m) - logf(s)") + f"""    for (j = 0; j < {k}; ++j) {{
        float s = 0.0f;
        for (i = 0; i < {n * k}; ++i) s += ec_stack_w[j * {n * k} + i] * d[i];
        out[j] = s + ec_stack_b[j];
    }}"""
    if combine == "vote":
        return "", f"""    for (j = 0; j < {k}; ++j) out[j] = 0.0f;
    for (i = 0; i < {n}; ++i) {{ /* one vote for each member's argmax (the first of equal values) */
        const int8_t *q = members + i * {k};
        int best = 0;
        for (j = 1; j < {k}; ++j) if (q[j] > q[best]) best = j;
        out[best] += 1.0f;
    }}
""" + softmax.replace("{SOFTMAX}", "expf(v[j] - m) / s") + f"""    for (j = 0; j < {k}; ++j) {{
        float p = d[j];
        for (i = 1; i < {n}; ++i) p += d[i * {k} + j];
        out[j] += 0.5f * (p / {n}.0f);
    }}"""
    decls = _floats("ec_weights", weights)
    return decls, softmax.replace("{SOFTMAX}", "expf(v[j] - m) / s") + f"""    for (j = 0; j < {k}; ++j) {{
        float p = ec_weights[0] * d[j];
        for (i = 1; i < {n}; ++i) p += ec_weights[i] * d[i * {k} + j];
        out[j] = logf(p > 1e-12f ? p : 1e-12f);
    }}"""


def generate(members: list[CExport], name: str, combine: str, weights: np.ndarray | None = None,
             stack: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """(header, source, each member's (header, source)) of the ensemble library; ``weights`` (average,
    weighted) and ``stack`` (weight, bias) as ``combine`` needs them."""
    N, n = name.upper(), len(members)
    g0 = members[0].graph
    tin, tout = g0.tensors[g0.input], g0.tensors[g0.output]
    k = tout.size
    arena = max(max(1, m.plan.peak // 4) for m in members) * 4
    requant = {i: r for i, m in enumerate(members) if (r := _input_requant(members[0].graph, m.graph)) is not None}
    member_sources = []
    for m in members:
        member_sources.append(generate_library(m.graph, m.plan, m.name, m.formats, shared=name))
    scales = ", ".join(_flt(m.graph.tensors[m.graph.output].q.scale) for m in members)
    zps = ", ".join(str(m.graph.tensors[m.graph.output].q.zero_point) for m in members)
    decls, body = _combiner(combine, n, k, weights, stack)
    plans = "\n".join(f" *   {m.name}: {m.plan.peak} bytes of activations" for m in members)
    header = f"""/* {name}: an ensemble of {n} int8 models generated by edgecompress, combined by {combine}.
 * The members run one after another in one static arena (the largest member's need):
{plans}
 * Input: int8 NHWC (real = scale * (q - zero_point)); output: {k} floats.
 */
#ifndef {N}_H
#define {N}_H

#include <stdint.h>

#define {N}_MEMBERS {n}
#define {N}_INPUT_SIZE {tin.size}
#define {N}_OUTPUT_SIZE {k}
#define {N}_ARENA_SIZE {arena}
#define {N}_INPUT_SCALE {tin.q.scale!r}f
#define {N}_INPUT_ZERO_POINT ({tin.q.zero_point})

typedef union {{ int32_t align; int8_t bytes[{arena}]; }} {name}_arena_t;
extern {name}_arena_t {name}_arena; /* the activations of whichever member runs */

/* Clears the activation arena. */
void {name}_init(void);
/* Runs every member on {N}_INPUT_SIZE int8 values and writes the {N}_OUTPUT_SIZE combined floats. */
int {name}_run(const int8_t *input, float *output);
/* As {name}_run, and writes each member's int8 output ({N}_MEMBERS x {N}_OUTPUT_SIZE) to members. */
int {name}_run_members(const int8_t *input, int8_t *members, float *output);

#endif
"""
    includes = "".join(f'#include "{m.name}.h"\n' for m in members)
    runs = "\n".join((f"""    for (j = 0; j < {tin.size}; ++j) {{ /* to {m.name}'s input scale and zero point */
        const int32_t v = ec_requant(input[j] - ({tin.q.zero_point}), {requant[i][0]}, {requant[i][1]}) + ({requant[i][2]});
        x[j] = (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
    }}
    {m.name}_run(x, members + {i * k});""" if i in requant else f"    {m.name}_run(input, members + {i * k});")
                     for i, m in enumerate(members))
    x_decl = f"\n    int8_t x[{tin.size}];" if requant else ""
    source = f"""/* {name}: generated by edgecompress. The members share one arena of {arena} bytes; the
 * combiner ({combine}) works in float32 on their dequantized outputs. */
#include <math.h>
#include <string.h>
#include "ec_kernels.h"
#include "{name}.h"
{includes}
{name}_arena_t {name}_arena;

static const float ec_out_scale[{n}] = {{{scales}}};
static const int32_t ec_out_zp[{n}] = {{{zps}}};
{decls}
void {name}_init(void) {{
    memset({name}_arena.bytes, 0, sizeof {name}_arena.bytes);
}}

int {name}_run_members(const int8_t *input, int8_t *members, float *out) {{
    float d[{n * k}];{x_decl}
    int i, j;
{runs}
    for (i = 0; i < {n}; ++i)
        for (j = 0; j < {k}; ++j) d[i * {k} + j] = (float)(members[i * {k} + j] - ec_out_zp[i]) * ec_out_scale[i];
{body}
    return 0;
}}

int {name}_run(const int8_t *input, float *output) {{
    int8_t members[{n * k}];
    return {name}_run_members(input, members, output);
}}
"""
    return header, source, member_sources


def _combine_params(model) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    n = len(model.members)
    if model.combine in ("average", "weighted"):
        w = getattr(model, "weights", None)
        return (w.numpy() if w is not None else torch.full((n,), 1 / n).numpy()).astype(np.float32), None
    if model.combine == "stack":
        lin = model.combiner
        return None, (lin.weight.detach().numpy().astype(np.float32), lin.bias.detach().numpy().astype(np.float32))
    return None, None


def lower_members(model, task, fmt: str = "c") -> list[Graph]:
    """Each member's integer graph."""
    return [lower_task(m, task, fmt) for m in model.members]


def _input_requant(g0: Graph, g: Graph) -> tuple[int, int, int] | None:
    """(multiplier, shift, zero point) taking member 0's int8 input to ``g``'s; None when they agree."""
    q0, q = g0.tensors[g0.input].q, g.tensors[g.input].q
    if (q.scale, q.zero_point) == (q0.scale, q0.zero_point):
        return None
    return (*quantize_multiplier(q0.scale / q.scale), q.zero_point)


def member_input(exp: EnsembleExport, i: int, q: np.ndarray) -> np.ndarray:
    """The int8 input member ``i`` runs on, from the ensemble's (member 0's) int8 input ``q``."""
    r = _input_requant(exp.members[0].graph, exp.members[i].graph)
    z0 = exp.members[0].graph.tensors[exp.members[0].graph.input].q.zero_point
    return q if r is None else requantize(q.astype(np.int64) - z0, r[0], r[1], r[2])


def member_formats(weight_format: str | dict[str, str], n: int) -> list[str | dict[str, str]]:
    """The recipe's ``c.format`` per member: one format for all, or ``{members.I.layer: format}``."""
    if isinstance(weight_format, str):
        return [weight_format] * n
    per: list[dict[str, str]] = [{} for _ in range(n)]
    for key, fmt in weight_format.items():
        m = re.fullmatch(r"members\.(\d+)\.(.+)", key)
        if m is None or int(m.group(1)) >= n:
            raise ArtifactError(f"c.format of an ensemble names layers as members.I.LAYER (I < {n}); got {key!r}")
        per[int(m.group(1))][m.group(2)] = fmt
    return per


def export_ensemble(model, task, out_dir: str | os.PathLike, *, name: str = "model", n_tests: int = 8,
                    weight_format: str | dict[str, str] = "auto", graphs: list[Graph] | None = None
                    ) -> EnsembleExport:
    """Write the ensemble's C library into ``out_dir`` with a harness ``NAME_test.c`` that prints the
    outputs for the first ``n_tests`` test inputs (see ``parse`` and ``reference``); ``weight_format``
    as ``export_c``'s, for every member or by ``members.I.layer``; ``graphs``: the members' integer
    graphs when already lowered (``lower_members``)."""
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ArtifactError(f"name must be a C identifier; got {name!r}")
    graphs = graphs or lower_members(model, task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (g, wf) in enumerate(zip(graphs, member_formats(weight_format, len(graphs)))):
        weighted = [op for op in g.ops if op.qweight is not None]
        wanted = resolve(wf, [op.layer for op in weighted])
        formats = {op.layer: choose(op, wanted[op.layer]) for op in weighted}
        members.append(CExport(out, f"{name}_m{i}", g, plan_arena(g), [], formats))
    weights, stack = _combine_params(model)
    header, source, member_sources = generate(members, name, model.combine, weights, stack)
    used = sorted(set().union(*(kernels_used(m.graph, m.formats) for m in members)))
    config = config_header(used, "the kernels the ensemble's members call")
    texts = [(f"{name}.h", header), (f"{name}.c", source), ("ec_config.h", config)]
    for m, (head, src) in zip(members, member_sources):
        texts += [(f"{m.name}.h", head), (f"{m.name}.c", src)]
    texts += kernel_texts()
    files = [write_atomic(out / f, lambda p, t=t: p.write_text(t)) for f, t in texts]
    exp = EnsembleExport(out, name, members, model.combine, max(max(1, m.plan.peak // 4) for m in members) * 4, files)
    x = torch.cat([xb for xb, _ in task.eval_data])[:n_tests]
    write_harness(exp, graphs[0].quantize_input(x))
    return exp


# ---- the reference, the harness, building and running --------------------------------------------

def reference(exp: EnsembleExport, q: np.ndarray, model, members: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(members' int8 outputs (N, members, K) from the integer reference, the combined float32 outputs
    from ``combine_outputs`` on their dequantized values); ``members``: those int8 outputs, when known."""
    from ...primitives.ensemble import combine_outputs

    outs = [run_int(m.graph, member_input(exp, i, q)).reshape(len(q), -1) for i, m in enumerate(exp.members)
            ] if members is None else list(members.transpose(1, 0, 2))
    deq = [torch.from_numpy(m.graph.dequantize_output(o)) for m, o in zip(exp.members, outs)]
    with torch.no_grad():
        combined = combine_outputs(deq, model.combine, getattr(model, "weights", None),
                                   getattr(model, "combiner", None))
    if model.combine == "logits":  # the C order: member 0 + member 1 + ..., then / n, in float32
        s = deq[0].numpy().copy()
        for d in deq[1:]:
            s = (s + d.numpy()).astype(np.float32)
        combined = torch.from_numpy((s / np.float32(len(deq))).astype(np.float32))
    return np.stack(outs, 1), combined.numpy().astype(np.float32)


def _harness(exp: EnsembleExport, inputs: np.ndarray) -> str:
    N, name, n, k = exp.name.upper(), exp.name, len(exp.members), exp.classes
    return f"""/* Test harness generated by edgecompress: runs the ensemble {name} on {len(inputs)} embedded
 * inputs and prints, one line per input, each member's int8 outputs then the combined floats as the
 * int32 of their bits (exact). With EC_COUNT_INSTRUCTIONS under QEMU -icount, also the SysTick ticks. */
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include "{name}.h"
{COUNTER}
{array("int8_t", "ec_test_inputs", inputs)}
int main(void) {{
    int8_t members[{n * k}];
    float out[{k}];
    int32_t bits;
    int i, j;
    {name}_init();
    EC_CALIBRATE();
    for (i = 0; i < {len(inputs)}; ++i) {{
        EC_TICK(t0);
        {name}_run_members(ec_test_inputs + i * {N}_INPUT_SIZE, members, out);
        EC_TOCK(t0);
        for (j = 0; j < {n * k}; ++j) printf("%d ", members[j]);
        for (j = 0; j < {k}; ++j) {{
            memcpy(&bits, &out[j], 4);
            printf(j + 1 < {k} ? "%ld " : "%ld\\n", (long)bits);
        }}
    }}
    return 0;
}}
"""


def write_harness(exp: EnsembleExport, inputs: np.ndarray, suffix: str = "") -> Path:
    return write_test(exp, suffix, _harness(exp, np.asarray(inputs, dtype=np.int8).reshape(len(inputs), -1)))


def parse(exp: EnsembleExport, stdout: str) -> tuple[np.ndarray, np.ndarray]:
    """(members' int8 outputs (N, members, K), combined float32 outputs (N, K)) the harness printed."""
    n, k = len(exp.members), exp.classes
    rows = [list(map(int, line.split())) for line in stdout.splitlines() if line.strip() and line[0] != "#"]
    if any(len(r) != n * k + k for r in rows):
        raise ArtifactError(f"ensemble harness printed a line without {n * k + k} values")
    a = np.array(rows, dtype=np.int64).reshape(-1, n * k + k)
    return a[:, :n * k].astype(np.int8).reshape(-1, n, k), a[:, n * k:].astype(np.int32).view(np.float32)


def build(exp: EnsembleExport, inputs: np.ndarray, target: str | None = None, count: bool = False) -> Path:
    """Compile the library and a harness over ``inputs``: for this machine (``target`` None, host
    ``gcc``) or a Cortex-M target (an ELF for ``toolchain.qemu``'s machine); links the C maths library."""
    harness = write_harness(exp, inputs, f"_{target or 'host'}")
    if target is None:
        return compile_host(exp.dir, exp.name, exp.sources, harness, libs=("-lm",))
    return build_elf(exp.dir, exp.name, exp.sources, harness, target, count, libs=("-lm",))


def run(exp: EnsembleExport, inputs: np.ndarray, target: str | None = None,
        timeout: float = 120) -> tuple[np.ndarray, np.ndarray]:
    """Build and run the harness on ``inputs`` (host, or ``target`` under qemu-system-arm): ``parse``'s pair."""
    exe = build(exp, inputs, target)
    out = run_tool([str(exe)], "host run").stdout if target is None else qemu(exe, target, timeout)
    return parse(exp, out)


@dataclass
class EnsembleSize:
    """``arm-none-eabi-size`` of the ensemble library, object by object (flash: text + data)."""

    total: ArmSize
    members: list[int]  # flash of each member's object (its weights and calls)
    combiner: int  # flash of NAME.o: the combiner and its constants
    kernels: int


def arm_size(exp: EnsembleExport, target: str = "cortex-m4") -> EnsembleSize:
    sizes = object_sizes(exp.dir, exp.sources, target)
    flash = {stem: text + data for stem, (text, data, _) in sizes.items()}
    return EnsembleSize(arm_size_of(exp.dir, exp.sources, target), [flash[m.name] for m in exp.members],
                        flash[exp.name], flash["ec_kernels"])


def count_instructions(exp: EnsembleExport, inputs: np.ndarray, target: str = "cortex-m4",
                       timeout: float = 300) -> Count:
    """Instructions per inference of the whole ensemble (members and combiner) under QEMU ``-icount``,
    as a single model's are counted (``toolchain.read_counts``)."""
    out = qemu(build(exp, inputs, target, count=True), target, timeout, icount=True)
    instructions, ticks, per_tick = read_counts(out, len(inputs), target)
    members = parse(exp, out)[0].reshape(len(inputs), -1)  # the members' int8 outputs, member after member
    return Count(target, TARGETS[target].machine, members, instructions, ticks, per_tick)
