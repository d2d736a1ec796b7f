"""Every exact encoding of one tensor, and the tensor back from its streams.

Each tensor is one of ``dense`` (its own dtype, or float16 when every value is exactly a float16),
``quant`` (integers times one float32 scale, exactly), ``codebook`` (indices into its distinct
values) or ``sparse`` (positions of the nonzero entries, as a bitmap or as gaps of ``gap_bits`` bits
where the largest symbol is a filler that skips ahead without a weight, as in Deep Compression;
then the nonzero values in one of the three forms above). Decoding is bit-exact: the decoded float32
bits equal the encoded ones, and the writer checks that before writing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import ArtifactError
from .header import DTYPES, MAX_ALPHABET, Stream, Tensor
from .streams import Encoded, decode_stream, encode_floats, encode_symbols


MAX_CODEBOOK = 4096


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def quant_grid(values: np.ndarray) -> tuple[float, int, np.ndarray] | None:
    """(scale, qmin, levels) with ``float32(levels + qmin) * float32(scale) == values`` bit for bit,
    when the values are integers times one float32 scale (what symmetric or affine integer
    quantization leaves in float weights); None otherwise."""
    u = np.unique(values)
    if u.size < 3 or u.size > MAX_ALPHABET or not np.all(np.isfinite(u)):
        return None
    step = float(np.diff(u.astype(np.float64)).min())
    big = u[np.argmax(np.abs(u))].astype(np.float64)
    if step <= 0 or abs(big / step) > (1 << 23):
        return None
    base = np.float32(big / np.rint(big / step))
    candidates, up, down = [base], base, base
    for _ in range(4):
        up = np.nextafter(up, np.float32(np.inf), dtype=np.float32)
        down = np.nextafter(down, np.float32(-np.inf), dtype=np.float32)
        candidates += [up, down]
    for scale in candidates:
        if not np.isfinite(scale) or scale == 0:
            continue
        q = np.rint(values.astype(np.float64) / np.float64(scale))
        qmin, qmax = int(q.min()), int(q.max())
        if qmax - qmin >= MAX_ALPHABET or max(abs(qmin), abs(qmax)) > (1 << 24):
            continue
        levels = (q - qmin).astype(np.uint32)
        if _same_bits(dequant(levels, qmin, float(scale)), values):
            return float(scale), qmin, levels
    return None


def dequant(levels: np.ndarray, qmin: int, scale: float) -> np.ndarray:
    return (levels.astype(np.int64) + qmin).astype(np.float32) * np.float32(scale)


@dataclass
class Candidate:
    fields: dict[str, Any]
    streams: list[Encoded]

    @property
    def size(self) -> int:
        return sum(len(s.data) for s in self.streams)


def _as_float16(values: np.ndarray) -> np.ndarray | None:
    half = values.astype(np.float16)
    return half if _same_bits(half.astype(np.float32), values) else None


def value_candidates(values: np.ndarray) -> list[tuple[str, dict[str, Any], list[Encoded]]]:
    """Exact encodings of a float32 vector: dense (fp32 or fp16), quant, codebook."""
    out = [("dense", {}, [encode_floats("values", values)])]
    half = _as_float16(values)
    if half is not None:
        out.append(("dense", {}, [encode_floats("values", half)]))
    grid = quant_grid(values) if values.size else None
    if grid is not None:
        scale, qmin, levels = grid
        out.append(("quant", {"scale": scale, "qmin": qmin},
                    [encode_symbols("indices", levels, int(levels.max()) + 1)]))
    bits = values.view(np.uint32)
    table, index = np.unique(bits, return_inverse=True)
    if 1 < table.size <= MAX_CODEBOOK or (table.size == 1 and values.size > 1):
        book = table.view(np.float32)
        half_book = _as_float16(book)
        out.append(("codebook", {}, [encode_symbols("indices", index.ravel(), int(table.size)),
                                     encode_floats("codebook", half_book if half_book is not None else book)]))
    return out


def relative_positions(flat_nonzero: np.ndarray, gap_bits: int) -> np.ndarray:
    """Gaps before each nonzero entry in ``gap_bits``-bit symbols; the largest symbol F = 2^b - 1 is a
    filler that skips F positions without a weight (Deep Compression's filler zero)."""
    filler = (1 << gap_bits) - 1
    idx = np.flatnonzero(flat_nonzero)
    gaps = np.diff(np.concatenate([[-1], idx])) - 1
    fills, rest = np.divmod(gaps, filler)
    reps = (fills + 1).astype(np.int64)
    sym = np.repeat(rest, reps)
    starts = np.cumsum(reps) - reps
    mark = np.ones(sym.size, dtype=bool)
    mark[starts + fills] = False
    sym[mark] = filler
    return sym.astype(np.uint32)


def decode_relative(sym: np.ndarray, gap_bits: int, numel: int) -> np.ndarray:
    filler = (1 << gap_bits) - 1
    is_fill = sym == filler
    advance = np.where(is_fill, filler, sym.astype(np.int64) + 1)
    pos = np.cumsum(advance)[~is_fill] - 1
    if pos.size and pos[-1] >= numel:
        raise ArtifactError(f"relative positions run to {int(pos[-1])}, past the tensor's {numel} entries")
    return pos


def tensor_candidates(arr: np.ndarray) -> list[Candidate]:
    """Every exact encoding of one initializer; the writer keeps the smallest."""
    if arr.dtype != np.float32:
        out = [Candidate({"encoding": "dense"}, [encode_floats("values", arr.ravel())])]
        if arr.dtype.kind in "iu" and arr.size > 1:  # integer weights: indices into their distinct values
            table, index = np.unique(arr.ravel(), return_inverse=True)
            if table.size <= MAX_CODEBOOK:
                out.append(Candidate({"encoding": "codebook"}, [
                    encode_symbols("indices", index.ravel(), int(table.size)), encode_floats("codebook", table)]))
        return out
    flat = arr.ravel()
    out = [Candidate({"encoding": kind, **extra}, streams) for kind, extra, streams in value_candidates(flat)]
    nz = flat.view(np.uint32) != 0
    n_nz = int(nz.sum())
    if 0 < n_nz < flat.size // 2 or (n_nz == 0 and flat.size > 0):
        positions = [({"positions": "bitmap"}, encode_symbols("positions", nz.astype(np.uint32), 2))]
        for b in range(1, 13):
            positions.append(({"positions": "relative", "gap_bits": b},
                              encode_symbols("positions", relative_positions(nz, b), 1 << b)))
        pos_fields, pos_stream = min(positions, key=lambda p: len(p[1].data))
        for kind, extra, streams in value_candidates(flat[nz]):
            out.append(Candidate({"encoding": "sparse", **pos_fields, "values": kind, **extra}, [pos_stream, *streams]))
    return out


def describe_encoding(t: Tensor) -> str:
    parts = [t.encoding]
    if t.encoding == "sparse":
        parts.append(f"{t.positions}" + (f" {t.gap_bits}-bit gaps" if t.gap_bits else ""))
        parts.append(f"values {t.values}")
    parts.append("/".join(f"{s.role}:{s.codec}" for s in t.streams))
    return " ".join(parts)


def _values(kind: str, t: Tensor, streams: list[Stream], payload: memoryview, count: int) -> np.ndarray:
    if kind == "dense":
        if len(streams) != 1 or streams[0].role != "values" or streams[0].count != count:
            raise ArtifactError(f"tensor {t.name!r}: dense values need one values stream of {count} items")
        v = decode_stream(streams[0], payload)
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f" and t.dtype == "float32":
            raise ArtifactError(f"tensor {t.name!r}: its values stream is not floating point")
        return v.astype(DTYPES[t.dtype]) if t.dtype == "float32" else v
    if kind == "quant":
        if len(streams) != 1 or streams[0].role != "indices" or streams[0].count != count \
                or t.scale is None or t.qmin is None:
            raise ArtifactError(f"tensor {t.name!r}: quant values need one indices stream of {count}, scale and qmin")
        return dequant(decode_stream(streams[0], payload), t.qmin, t.scale)
    if len(streams) != 2 or [s.role for s in streams] != ["indices", "codebook"] or streams[0].count != count:
        raise ArtifactError(f"tensor {t.name!r}: codebook values need an indices stream of {count} and a codebook")
    allowed = ("float32", "float16") if t.dtype == "float32" else (t.dtype,)
    if streams[1].dtype not in allowed or streams[1].count != (streams[0].alphabet or 0):
        raise ArtifactError(f"tensor {t.name!r}: its codebook must hold one {' or '.join(allowed)} per index symbol")
    book = decode_stream(streams[1], payload).astype(DTYPES[t.dtype])
    return book[decode_stream(streams[0], payload)]


def decode_tensor(t: Tensor, payload: memoryview) -> np.ndarray:
    numel = math.prod(t.shape)
    if t.dtype != "float32" and (t.encoding not in ("dense", "codebook")
                                 or t.encoding == "codebook" and t.dtype in ("float16", "float64", "bool")):
        raise ArtifactError(f"tensor {t.name!r}: only float32 tensors may use encoding {t.encoding}")
    if t.encoding != "sparse":
        flat = _values(t.encoding, t, t.streams, payload, numel)
    else:
        if not t.streams or t.streams[0].role != "positions" or t.positions is None or t.values is None:
            raise ArtifactError(f"tensor {t.name!r}: a sparse tensor needs positions, then values")
        ps = t.streams[0]
        if t.positions == "bitmap":
            if ps.count != numel or ps.alphabet != 2:
                raise ArtifactError(f"tensor {t.name!r}: a bitmap needs {numel} symbols of alphabet 2")
            pos = np.flatnonzero(decode_stream(ps, payload))
        else:
            if t.gap_bits is None or ps.alphabet != 1 << t.gap_bits or ps.count > 2 * numel + 1:
                raise ArtifactError(f"tensor {t.name!r}: relative positions need gap_bits and at most "
                                    f"{2 * numel + 1} symbols of alphabet 2^gap_bits")
            pos = decode_relative(decode_stream(ps, payload), t.gap_bits, numel)
        flat = np.zeros(numel, np.float32)
        flat[pos] = _values(t.values, t, t.streams[1:], payload, int(pos.size))
    if flat.size != numel:
        raise ArtifactError(f"tensor {t.name!r} decodes to {flat.size} values; its shape {t.shape} needs {numel}")
    return flat.reshape(t.shape)
