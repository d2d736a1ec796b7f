"""Weight formats of the C export: exact bytes of each encoding, the per-layer choice and its fallbacks,
and every format (block positions of 2, 4 and 8 weights and per-channel codebooks included) bit-exact
with the integer reference on the host (every test input) and under QEMU for Cortex-M4, Cortex-M0 and
Cortex-M55 (a few inputs, several formats per build)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from edgecompress.errors import RecipeError
from edgecompress.export import c as cexp
from edgecompress.export.cformats import CHOICES, FORMATS, KERNELS, choose, encode, resolve, weight_rows
from edgecompress.export.ir import lower, run_int

from .test_export_c import SMALL, needs_arm


def _compressible(model: str, sparsity: float, levels: int, seed: int = 0, block: int = 1):
    """A small model's integer graph with its weight codes snapped to ``levels`` values in -7..7 (none of
    them 0) and a ``sparsity`` fraction of its blocks of ``block`` consecutive weights of a row (in the
    kernels' order) set to zero (what pruning and weight sharing leave), and its test inputs."""
    m, calib, test = SMALL[model]()
    g = lower(m, test[:1], calib=calib)
    rng = np.random.default_rng(seed)
    grid = np.linspace(-7, 7, levels).round().astype(np.int64)
    for op in g.ops:
        if op.qweight is not None:
            q = grid[np.abs(op.qweight.astype(np.int64)[..., None] * 7 / 127 - grid).argmin(-1)]
            op.qweight = q.astype(np.int8)
            rows = weight_rows(op)
            pruned = np.repeat(rng.random((rows.shape[0], -(-rows.shape[1] // block))) < sparsity, block, axis=1)
            rows[pruned[:, :rows.shape[1]]] = 0
            q = rows.T if op.kind == "dwconv" else rows  # back from the kernels' order
            op.qweight = q.reshape(op.qweight.shape).astype(np.int8)
    return g, g.quantize_input(test)


# ---- encodings ----------------------------------------------------------------------------------

def test_each_encoding_holds_the_codes_in_the_bytes_stated():
    rows = np.array([[0, 3, 0, 0, -2, 0, 0, 0, 0, 7], [0, 0, 0, 0, 0, 0, 0, 0, 3, 0]])
    int4 = encode(rows, "int4")
    assert int4.arrays["_wq"][1].tolist() == [0x30, 0x00, 0x0E, 0x00, 0x70, 0x00, 0x00, 0x00, 0x00, 0x03]
    cb = encode(rows, "codebook")
    assert (cb.bits, cb.arrays["_wt"][1].tolist(), cb.nbytes) == (2, [-2, 0, 3, 7], 6 + 4)  # 20 x 2 bits + 1 pad
    runs = encode(rows, "sparse", "runs")
    assert runs.arrays["_wg"][1].tolist() == [1, 2, 4, 8]  # zeros skipped before each stored value
    assert runs.arrays["_wv"][1].tolist() == [3, -2, 7, 3] and runs.arrays["_wn"][1].tolist() == [3, 1]
    assert runs.nbytes == 4 + 4 + 2 * 2
    runs4 = encode(rows, "sparse", "runs4")
    assert runs4.arrays["_wg"][1].tolist() == [0x21, 0x84]  # the same run lengths, two a byte, low nibble first
    assert runs4.nbytes == 4 + 2 + 2 * 2
    mask = encode(rows, "sparse", "bitmask")
    assert mask.arrays["_wm"][1].tolist() == [0b00010010, 0b10, 0, 0b01]  # 2 bytes per row of 10
    assert mask.nbytes == 4 + 4 == encode(rows, "sparse").nbytes  # the smaller: the bitmask
    scb = encode(rows, "sparse-codebook")
    assert (scb.bits, scb.arrays["_wt"][1].tolist(), scb.positions) == (2, [-2, 3, 7], "bitmask")
    pc = encode(rows, "channel-codebook")  # row tables [-2, 0, 3, 7] and [0, 3] (padded): 2-bit indices
    assert pc.arrays["_wt"][1].tolist() == [-2, 0, 3, 7, 0, 3, 0, 0]
    assert pc.arrays["_wq"][1].tolist() == [0b01011001, 0b01010100, 0b00001101, 0, 0b00010000, 0]  # 40 bits, pad
    assert (pc.bits, pc.table_stride, pc.nbytes) == (2, 4, 6 + 8)
    assert pc.describe() == "channel-codebook 2-bit, per-channel tables of 4 values"


def test_block_positions_hold_the_blocks_with_a_nonzero_and_auto_picks_them_where_smallest():
    rows = np.zeros((2, 32), np.int64)  # block pruned: blocks of 4 weights kept whole or zero
    rows[0, :4], rows[0, 28:], rows[1, 8:12] = [1, 2, 3, 4], [5, 6, 7, 8], [-1, -2, -3, -4]
    blocks = encode(rows, "sparse", "blocks")
    assert (blocks.positions, blocks.block, blocks.describe()) == ("blocks", 4, "sparse, blocks of 4")
    assert blocks.arrays["_wm"][1].tolist() == [0b10000001, 0b00000100]  # 8 blocks of 4 per row: 1 byte
    assert blocks.arrays["_wv"][1].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, -1, -2, -3, -4]
    assert blocks.nbytes == 2 + 12
    # blocks of 2: 2 mask bytes a row, the same 12 codes; of 8: 1 byte a row, 3 blocks of 8 codes
    others = {"bitmask": 8 + 12, "runs": 12 + 12 + 4, "runs4": 7 + 13 + 4}  # runs4: a gap of 24 is 15, 0, 8
    assert {p: encode(rows, "sparse", p).nbytes for p in others} == others
    scb = encode(rows, "sparse-codebook", "blocks")  # 12 values: 4-bit indices, two a byte
    assert scb.arrays["_wt"][1].tolist() == [-4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8]
    assert scb.arrays["_wq"][1].tolist() == [0x54, 0x76, 0x98, 0xBA, 0x23, 0x01, 0]
    assert (scb.nbytes, scb.describe()) == (7 + 12 + 2, "sparse-codebook 4-bit, 12 values, blocks of 4")
    # a row that ends in a short block stores it whole: 10 weights in blocks of 4, the last of 2 plus 2 zeros
    short = encode(np.array([[0, 0, 0, 0, 0, 0, 0, 0, 9, 0]]), "sparse", "blocks")
    assert (short.block, short.arrays["_wv"][1].tolist(), short.arrays["_wm"][1].tolist()) == (2, [9, 0], [0b10000])
    op = _fc_op(rows)
    auto = choose(op, "auto")
    assert (auto.format, auto.positions, auto.block, auto.nbytes) == ("sparse", "blocks", 4, 14)
    assert auto.reason == ("smallest of dense 64 B, codebook 46 B, sparse 14 B, sparse-codebook 21 B, "
                           "channel-codebook 51 B")  # int4 cannot hold 8


def test_auto_picks_per_channel_codebooks_where_each_row_has_few_codes():
    sign = np.array([1, -1, 1, 1, -1, -1, 1, -1, 1, 1, 1, 1, -1, -1, -1, -1])
    rows = np.arange(1, 5)[:, None] * sign  # row o: +-(o + 1), 8 codes in the layer, 2 in a row
    auto = choose(_fc_op(rows), "auto")
    assert (auto.format, auto.bits, auto.nbytes) == ("channel-codebook", 1, 8 + 1 + 8)
    assert auto.arrays["_wt"][1].tolist() == [-1, 1, -2, 2, -3, 3, -4, 4]
    assert auto.arrays["_wq"][1].tolist() == [0b01001101, 0b00001111] * 4 + [0]  # bit set where the code is +
    assert auto.reason == ("smallest of dense 64 B, int4 32 B, codebook 33 B, sparse 68 B, sparse-codebook 37 B, "
                           "channel-codebook 17 B")  # sparse: 2 blocks of 8 a row, 1 mask byte; 3-bit indices


def _fc_op(rows: np.ndarray):
    """A Linear op of the integer graph holding ``rows`` as its codes."""
    from torch import nn
    import torch

    m = nn.Sequential(nn.Linear(rows.shape[1], rows.shape[0])).eval()
    x = torch.rand(4, rows.shape[1], generator=torch.Generator().manual_seed(0))
    op = lower(m, x[:1], calib=[x]).ops[0]
    op.qweight = rows.astype(np.int8)
    return op


def test_long_runs_continue_with_a_stored_zero():
    row = np.zeros((1, 600), np.int64)
    row[0, [5, 400, 599]] = [1, -1, 2]
    e = encode(row, "sparse", "runs")
    assert e.arrays["_wg"][1].tolist() == [5, 255, 138, 198]  # 394 zeros: 255, a stored 0, then 138
    assert e.arrays["_wv"][1].tolist() == [1, 0, -1, 2] and e.arrays["_wn"][1].tolist() == [4]
    row = np.zeros((1, 40), np.int64)
    row[0, [3, 37]] = [5, -6]
    e = encode(row, "sparse", "runs4")  # 33 zeros: 15, a stored 0, 15, a stored 0, then 1
    assert e.arrays["_wg"][1].tolist() == [0xF3, 0x1F] and e.arrays["_wv"][1].tolist() == [5, 0, 0, -6]


def test_auto_picks_the_smallest_and_a_forced_format_falls_back_with_its_reason():
    g, _ = _compressible("grouped", 0.9, 16)
    op = next(o for o in g.ops if o.layer == "g1")
    rows = weight_rows(op)
    sizes = {f: encode(rows, f).nbytes for f in FORMATS}
    auto = choose(op, "auto")
    assert auto.nbytes == min(sizes.values()) < sizes["dense"] == rows.size
    assert auto.reason == "smallest of " + ", ".join(f"{f} {sizes[f]:,} B" for f in FORMATS)
    m, calib, test = SMALL["grouped"]()
    wide = next(o for o in lower(m, test[:1], calib=calib).ops if o.layer == "g1")
    fell = choose(wide, "int4")
    lo, hi = int(wide.qweight.min()), int(wide.qweight.max())
    assert fell.format == "dense"
    assert fell.reason == f"int4 forced but int4 holds codes -8..7; this layer's span {lo}..{hi}: fell back to the " \
                          "smallest that fits"
    assert choose(op, "sparse/runs").positions == "runs" and choose(op, "sparse/runs").reason == "sparse/runs forced"


def test_format_names_are_checked():
    with pytest.raises(RecipeError) as e:
        resolve("zip", ["fc"])
    assert str(e.value) == f"c.format must be one of {', '.join(CHOICES)}; got 'zip'"
    with pytest.raises(RecipeError) as e:
        resolve({"fc2": "int4"}, ["fc"])
    assert str(e.value) == "c.format names layer 'fc2', which has no weights; layers: fc"


# ---- generated C --------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [m for m in SMALL if m not in ("activations", "shuffle")])  # no new weighted op
@pytest.mark.parametrize("fmt,block", [
    ("int4", 1), ("codebook", 1), ("channel-codebook", 1), ("sparse/bitmask", 1), ("sparse/runs", 1),
    ("sparse/runs4", 1), ("sparse-codebook/bitmask", 1), ("sparse-codebook/runs", 1), ("sparse-codebook/runs4", 1),
    ("sparse/blocks", 2), ("sparse-codebook/blocks", 4)])  # QEMU below runs blocks of 4 and 8
def test_every_format_is_bit_exact_on_the_host(tmp_path, model, fmt, block):
    g, q = _compressible(model, 0.8, 12, block=block)
    exp = cexp.export_c(g, tmp_path, name="net", weight_format=fmt)
    assert {e.format for e in exp.formats.values()} == {fmt.split("/")[0]}
    if block > 1:  # the pruned block size is what some layer stores (a short row may take another)
        assert block in {e.block for e in exp.formats.values()}
    assert np.array_equal(cexp.run_host(exp, q), run_int(g, q))
    config = (tmp_path / "ec_config.h").read_text()
    assert ("EC_SPARSE_KERNELS" in config) == fmt.startswith("sparse")
    assert ("EC_PACKED_KERNELS" in config) == (not fmt.startswith("sparse"))
    assert ("EC_SPARSE_BLOCKS" in config) == fmt.endswith("/blocks")  # compiled only where a layer stores it
    assert ("EC_PACKED_CHANNEL" in config) == (fmt == "channel-codebook")


MIXED = {  # several formats per build, so each QEMU run covers them all: (model, pruned block size)
    ("grouped", 1): {"stem": "int4", "g1": "codebook", "g2": "sparse/runs", "pw": "sparse-codebook/bitmask",
                     "fc": "sparse/bitmask"},
    ("everything", 1): {"conv": "sparse/runs4", "dw": "sparse-codebook/runs", "pw": "sparse-codebook/runs4",
                        "fc": "sparse/runs"},
    ("everything", 4): {"conv": "sparse/blocks", "dw": "sparse-codebook/blocks", "pw": "channel-codebook",
                        "fc": "sparse/bitmask"},  # blocks and a bitmask: the kernels test which at run time
    ("grouped", 8): {"stem": "sparse/blocks", "g1": "sparse/runs", "g2": "sparse-codebook/blocks",
                     "pw": "sparse/blocks", "fc": "channel-codebook"},
}


@needs_arm
def test_formats_under_qemu_match_the_reference(tmp_path):
    for (model, block), formats in MIXED.items():
        g, q = _compressible(model, 0.8, 12, block=block)
        q = q[:2]
        exp = cexp.export_c(g, tmp_path / f"{model}{block}", name="net", weight_format=formats)
        assert {k: e.format for k, e in exp.formats.items()} == {k: f.split("/")[0] for k, f in formats.items()}
        assert block == 1 or block in {e.block for e in exp.formats.values()}
        ref = run_int(g, q)
        for target in ("cortex-m4", "cortex-m0", "cortex-m55"):
            assert np.array_equal(cexp.run_qemu(exp, cexp.build_arm(exp, q, target), target), ref), (model, target)
        if block == 4:  # decoded on the fly: static RAM (the arena) is the dense library's
            dense = cexp.export_c(g, tmp_path / "dense", name="net", weight_format="dense")
            assert cexp.arm_size(exp).ram == cexp.arm_size(dense).ram == exp.plan.peak


def test_a_kind_without_the_kernel_falls_back_with_the_reason(monkeypatch):
    g, _ = _compressible("everything", 0.8, 12, block=4)
    dw = next(o for o in g.ops if o.kind == "dwconv")
    monkeypatch.setitem(KERNELS, "dwconv", {"dense", "int4", "codebook", "sparse"})
    for fmt in ("channel-codebook", "sparse-codebook/blocks"):
        e = choose(dw, fmt)
        assert e.nbytes == min(encode(weight_rows(dw), f).nbytes for f in KERNELS["dwconv"])
        assert e.reason == f"{fmt} forced but no {fmt.split('/')[0]} kernel for dwconv: fell back to the smallest " \
                           "that fits"


# ---- what flash holds ---------------------------------------------------------------------------

def _defined_functions(obj) -> set[str]:
    out = cexp.run_tool(["nm", "--defined-only", str(obj)], "nm").stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()[1] == "T"}


def test_only_the_kernels_a_model_calls_are_compiled(tmp_path):
    g, _ = _compressible("everything", 0.8, 12)
    formats = {"conv": "sparse/bitmask", "dw": "sparse-codebook/bitmask", "pw": "int4", "fc": "dense"}
    exp = cexp.export_c(g, tmp_path, name="net", weight_format=formats)
    assert re.findall(r"#define (\w+) 1", (tmp_path / "ec_config.h").read_text()) == [
        "EC_PACKED_INT4", "EC_PACKED_KERNELS", "EC_SPARSE_KERNELS", "EC_SPARSE_MASK", "EC_SPARSE_TABLE",
        "EC_SPARSE_VALUES", "EC_USE_ADD", "EC_USE_AVGPOOL", "EC_USE_CONV_PACKED", "EC_USE_CONV_SPARSE", "EC_USE_FC",
        "EC_USE_MAXPOOL", "EC_USE_RELU"]
    obj = tmp_path / "k.o"
    cexp.run_tool(["gcc", *cexp.CFLAGS, f"-I{tmp_path}", "-c", str(exp.dir / "ec_kernels.c"), "-o", str(obj)], "gcc")
    assert _defined_functions(obj) == {"ec_requant", "ec_add", "ec_avgpool", "ec_conv_packed", "ec_conv_sparse",
                                       "ec_fc", "ec_maxpool", "ec_relu"}
    cexp.run_tool(["gcc", *cexp.CFLAGS, "-DEC_ALL_KERNELS", f"-I{tmp_path}", "-c", str(exp.dir / "ec_kernels.c"), "-o",
               str(obj)], "gcc")  # every kernel and variant together builds warning-free too
    assert len(_defined_functions(obj)) == 17


def test_one_multiplier_serves_a_layer_with_one_weight_scale(tmp_path):
    g, q = _compressible("grouped", 0.8, 12)
    for op in g.ops:
        if op.qweight is not None and op.layer != "stem":  # as weight sharing leaves them: one scale per layer
            op.multiplier[:] = op.multiplier.reshape(-1)[0]
            op.shift[:] = op.shift.reshape(-1)[0]
    formats = {"stem": "dense", "g1": "sparse/runs", "g2": "codebook", "pw": "dense", "fc": "dense"}
    exp = cexp.export_c(g, tmp_path, name="net", weight_format=formats)
    source = (tmp_path / "net.c").read_text()
    assert "stem_m[8]" in source and "stem_s[8]" in source
    assert all(f"{k}_m[1]" in source and f"{k}_s[1]" in source for k in ("g1", "g2", "pw", "fc"))
    assert np.array_equal(cexp.run_host(exp, q), run_int(g, q))


@pytest.mark.parametrize("channels,multiplier", [(6, 1), (3, 2)])
def test_depthwise_kernel_four_channels_at_a_time_and_the_rest_is_bit_exact(tmp_path, channels, multiplier):
    """ec_dwconv takes four channels a step (SMLABB/SMLATT on Cortex-M4) and the rest one at a time:
    6 channels leave two over; a depth multiplier of 2 runs every channel alone."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(channels, channels * multiplier, 3, stride=2, padding=1, groups=channels)).eval()
    x = torch.rand(8, channels, 9, 9, generator=torch.Generator().manual_seed(1)) - 0.3
    g = lower(m, x[:1], calib=[x])
    assert g.ops[0].kind == "dwconv"
    q = g.quantize_input(x)
    exp = cexp.export_c(g, tmp_path, name="net", weight_format="dense")
    ref = run_int(g, q).reshape(len(q), -1)
    assert np.array_equal(cexp.run_host(exp, q), ref)
    if cexp.have_toolchain():
        for target in ("cortex-m4", "cortex-m0"):
            assert np.array_equal(cexp.run_qemu(exp, cexp.build_arm(exp, q[:2], target), target), ref[:2]), target
