"""Weight formats of the C export: how each layer's int8 weight codes are stored in flash.

Every format holds exactly the graph's int8 codes, so the kernels that decode them on the fly compute
the integers the dense kernel does (no scratch buffer: peak RAM is the dense library's). A layer's
weights are viewed as rows, one per output channel, in the order the kernels read them (conv OHWI,
a grouped conv's I being its channels per group; depthwise as O x kh*kw; Linear O x I):

- ``dense``: one int8 per weight;
- ``int4``: two weights per byte, low nibble first, when every code is in -8..7;
- ``codebook``: b-bit indices (2-8 bits, LSB first) into the layer's table of its distinct codes
  (what weight sharing leaves: a clustered layer takes 2^bits values);
- ``sparse``: the nonzero codes in row order and their positions, either a bitmask (one bit per
  weight), run lengths (zeros skipped before each entry, one byte or, ``runs4``, one nibble each;
  a longer gap continues with a stored 0) plus a 16-bit entry count per row, or ``blocks``: one bit
  per block of B = 2, 4 or 8 consecutive weights of a row (the last block of a row may be short), and
  all B codes of each block with a nonzero, zeros inside kept (what block and N:M pruning leave);
  whichever is smallest;
- ``sparse-codebook``: positions as ``sparse``, values as ``codebook`` indices;
- ``channel-codebook``: as ``codebook``, with one table per output row of that row's distinct codes
  (every table as long as the longest, indices of ceil(log2 of that) bits, at least 1), for
  per-channel quantization that leaves each row few codes but the layer many.

``choose(op, "auto")`` picks the format with the fewest bytes; a forced format a layer cannot use
(int4 on codes outside -8..7, a format its kind has no kernel for) falls back to the smallest that
it can, and the choice carries the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import RecipeError
from .ir import Op

FORMATS = ("dense", "int4", "codebook", "sparse", "sparse-codebook", "channel-codebook")
SPARSE = ("sparse", "sparse-codebook")
POSITIONS = ("bitmask", "runs", "runs4", "blocks")
CHOICES = ("auto", *FORMATS, *(f"{f}/{p}" for f in SPARSE for p in POSITIONS))  # sparse/runs forces runs
KERNELS = {kind: set(FORMATS) for kind in ("conv", "dwconv", "fc")}  # the C kernels per layer kind
RUN_MAX = {"runs": 255, "runs4": 15}  # largest run length one entry holds
BLOCKS = (8, 4, 2)  # weights per block that block positions try (on equal bytes the first: fewer blocks)


@dataclass
class Encoded:
    """One layer's weights in one format: the arrays the C file declares and their bytes."""

    format: str
    arrays: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # suffix -> (C type, values)
    bits: int = 8  # bits per codebook index
    positions: str = ""  # sparse formats: "bitmask", "runs", "runs4" or "blocks"
    block: int = 0  # block positions: weights per block
    table_stride: int = 0  # channel-codebook: entries of each row's table
    reason: str = ""  # why this format (auto choice, or the fallback from a forced one)

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.itemsize for _, a in self.arrays.values()))

    def describe(self) -> str:
        what = self.format
        if self.table_stride:
            what += f" {self.bits}-bit, per-channel tables of {self.table_stride} values"
        elif "codebook" in self.format:
            what += f" {self.bits}-bit, {self.arrays['_wt'][1].size} values"
        if self.positions:
            what += f", {self.positions}" + (f" of {self.block}" if self.block else "")
        return what


def weight_rows(op: Op) -> np.ndarray:
    """The layer's int8 codes as (outputs, weights per output) in the kernels' reading order."""
    q = op.qweight.astype(np.int64)
    if op.kind == "dwconv":  # 1HWO -> O x (kh*kw)
        return np.ascontiguousarray(q.reshape(-1, q.shape[-1]).T)
    return q.reshape(q.shape[0], -1)


def _pack_bits(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices of ``bits`` bits, LSB first, with one byte of padding the decoder may read past the end."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    planes = ((idx[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.concatenate([np.packbits(planes, bitorder="little"), np.zeros(1, np.uint8)])


def _codebook(values: np.ndarray, extra: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, int]:
    table = np.unique(np.concatenate([values.reshape(-1), np.array(extra, dtype=np.int64)]))
    bits = max(2, int(np.ceil(np.log2(max(len(table), 2)))))
    return table.astype(np.int8), np.searchsorted(table, values.reshape(-1)), bits


def _channel_codebook(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tables, indices, bits, entries per table): row o's codes are indices into its own table, row o of
    ``tables`` (its distinct codes, ascending, padded with zeros to the longest row's count)."""
    tables = [np.unique(r) for r in rows]
    stride = max(len(t) for t in tables)
    out = np.zeros((len(rows), stride), np.int64)
    idx = np.zeros(rows.shape, np.int64)
    for o, (r, t) in enumerate(zip(rows, tables)):
        out[o, :len(t)] = t
        idx[o] = np.searchsorted(t, r)
    return out.astype(np.int8).reshape(-1), idx, max(1, int(np.ceil(np.log2(stride)))), stride


def _blocks(rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(bitmask over each row's blocks of ``block`` weights, the codes of the blocks whose bit is set)."""
    n_blocks = -(-rows.shape[1] // block)
    padded = np.zeros((len(rows), n_blocks * block), np.int64)
    padded[:, :rows.shape[1]] = rows
    padded = padded.reshape(len(rows), n_blocks, block)
    on = (padded != 0).any(-1)
    return np.packbits(on, axis=1, bitorder="little").reshape(-1), padded[on].reshape(-1)


def _runs(rows: np.ndarray, run_max: int = 255) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(run lengths, stored values, entries per row); None when a row has more entries than 16 bits hold."""
    gaps, vals, counts = [], [], []
    for r in rows:
        prev, n = -1, 0
        for p in np.flatnonzero(r):
            while p - prev - 1 > run_max:  # a stored zero carries the run on
                prev += run_max + 1
                gaps.append(run_max)
                vals.append(0)
                n += 1
            gaps.append(p - prev - 1)
            vals.append(int(r[p]))
            prev, n = p, n + 1
        counts.append(n)
    if counts and max(counts) > 0xFFFF:
        return None
    return np.array(gaps, np.uint8), np.array(vals, np.int64), np.array(counts, np.uint16)


def encode(rows: np.ndarray, fmt: str, positions: str | None = None) -> Encoded | str:
    """``rows`` in format ``fmt`` (sparse formats: with ``positions``, else the smaller), or the reason the
    format cannot hold them."""
    if fmt == "dense":
        return Encoded("dense", {"_w": ("int8_t", rows.astype(np.int8).reshape(-1))})
    if fmt == "int4":
        lo, hi = int(rows.min()), int(rows.max())
        if lo < -8 or hi > 7:
            return f"int4 holds codes -8..7; this layer's span {lo}..{hi}"
        nib = (rows.reshape(-1) & 15).astype(np.uint8)
        nib = np.concatenate([nib, np.zeros(len(nib) % 2, np.uint8)])
        return Encoded("int4", {"_wq": ("uint8_t", nib[0::2] | (nib[1::2] << 4))})
    if fmt == "codebook":
        table, idx, bits = _codebook(rows)
        if bits > 8:
            return f"codebook holds at most 256 distinct values; this layer has {len(table)}"
        return Encoded("codebook", {"_wq": ("uint8_t", _pack_bits(idx, bits)), "_wt": ("int8_t", table)}, bits)
    if fmt == "channel-codebook":
        tables, idx, bits, stride = _channel_codebook(rows)
        return Encoded(fmt, {"_wq": ("uint8_t", _pack_bits(idx, bits)), "_wt": ("int8_t", tables)}, bits,
                       table_stride=stride)
    if fmt in ("sparse", "sparse-codebook"):
        options = []
        nz = rows[rows != 0]
        mask = np.packbits(rows != 0, axis=1, bitorder="little").reshape(-1)
        if positions in (None, "bitmask"):
            options.append(("bitmask", {"_wm": ("uint8_t", mask)}, nz, 0))
        for kind, run_max in RUN_MAX.items():
            runs = _runs(rows, run_max) if positions in (None, kind) else None
            if positions == kind and runs is None:
                return "run lengths count at most 65,535 entries per row"
            if runs is not None:
                gaps, vals, counts = runs
                gaps = gaps if kind == "runs" else _pack_bits(gaps, 4)[:(len(gaps) + 1) // 2]
                options.append((kind, {"_wg": ("uint8_t", gaps), "_wn": ("uint16_t", counts)}, vals, 0))
        if positions in (None, "blocks"):
            for block in BLOCKS:
                bmask, vals = _blocks(rows, block)
                options.append(("blocks", {"_wm": ("uint8_t", bmask)}, vals, block))
        best = None
        for positions, arrays, vals, block in options:
            if fmt == "sparse":
                e = Encoded(fmt, {"_wv": ("int8_t", vals.astype(np.int8)), **arrays}, 8, positions, block=block)
            else:
                table, idx, bits = _codebook(vals)
                e = Encoded(fmt, {"_wq": ("uint8_t", _pack_bits(idx, bits)), "_wt": ("int8_t", table), **arrays},
                            bits, positions, block=block)
            if best is None or e.nbytes < best.nbytes:
                best = e
        return best
    raise AssertionError(fmt)


def choose(op: Op, fmt: str = "auto") -> Encoded:
    """The format of ``op``'s weights: ``fmt``, or with ``auto`` (and when ``fmt`` cannot hold them or its
    kind has no kernel for it) the smallest one that can."""
    rows = weight_rows(op)
    wanted = fmt
    fmt, _, positions = fmt.partition("/")
    kernels = KERNELS[op.kind]
    cands: dict[str, Encoded] = {}
    why: dict[str, str] = {}
    for f in FORMATS:
        if f not in kernels:
            why[f] = f"no {f} kernel for {op.kind}"
            continue
        e = encode(rows, f, positions if f == fmt and positions else None)
        if isinstance(e, str):
            why[f] = e
        else:
            cands[f] = e
    best = min(cands.values(), key=lambda e: (e.nbytes, FORMATS.index(e.format)))
    if fmt == "auto":
        best.reason = "smallest of " + ", ".join(f"{f} {e.nbytes:,} B" for f, e in cands.items())
        return best
    if fmt in cands:
        cands[fmt].reason = f"{wanted} forced"
        return cands[fmt]
    best.reason = f"{wanted} forced but {why[fmt]}: fell back to the smallest that fits"
    return best


def resolve(spec: str | dict[str, str], layers: list[str]) -> dict[str, str]:
    """A format per layer from one format for all or ``{layer: format, ...}`` (others ``auto``)."""
    if isinstance(spec, str):
        spec = {layer: spec for layer in layers}
    out = {layer: "auto" for layer in layers}
    for layer, f in spec.items():
        if f not in CHOICES:
            raise RecipeError(f"c.format must be one of {', '.join(CHOICES)}; got {f!r}")
        if layer not in out:
            raise RecipeError(f"c.format names layer {layer!r}, which has no weights; layers: {', '.join(layers)}")
        out[layer] = f
    return out
