"""The packed ``.ecz`` artifact: an ONNX graph without its weights, and every weight tensor in the
smallest exact encoding found for it.

Layout (all integers little-endian)::

    magic    4 bytes  b"\\x89ECZ"
    version  1 byte   1
    flags    1 byte   bit 0: the header is zstd-compressed
    hlen     4 bytes  length of the header as stored
    crc32    4 bytes  CRC-32 of everything after these 14 bytes (checked after the header)
    header   hlen bytes: JSON described by ecz.schema.json (``Header`` below)
    payload  the streams the header points at (offsets relative to the payload's start)

Each tensor is one of ``dense`` (its own dtype, or float16 when every value is exactly a float16),
``quant`` (integers times one float32 scale, exactly), ``codebook`` (indices into its distinct
values) or ``sparse`` (positions of the nonzero entries, as a bitmap or as gaps of ``gap_bits`` bits
where the largest symbol is a filler that skips ahead without a weight, as in Deep Compression;
then the nonzero values in one of the three forms above). Every stream is then stored as the
smallest of plain (``raw`` bytes or ``bits`` packed), ``zstd``, or ``ans`` (rANS with the symbol
counts stored in front, through constriction). Decoding is bit-exact: the decoded float32 bits
equal the encoded ones, and the writer checks that before writing.

Reading never trusts the file: sizes, offsets, shapes and decoded lengths are checked before
anything is allocated, and every failure is one line of ``ArtifactError``.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .. import args
from ..errors import ArtifactError
from ..files import write_atomic

MAGIC = b"\x89ECZ"
VERSION = 1
PREFIX = struct.Struct("<4sBBII")  # magic, version, flags, header length, crc32
FLAG_ZSTD_HEADER = 1
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 31           # per tensor
EXPANSION = 1 << 12              # decoded elements per byte of file, at most
MAX_HEADER = 1 << 24             # decompressed header bytes
MAX_ALPHABET = 1 << 16
MAX_CODEBOOK = 4096
ZSTD_LEVEL = 19                  # streams up to 128 KiB
ZSTD_LEVEL_LARGE = 9             # larger streams (level 19 costs seconds there and saves little)
SCHEMA_PATH = Path(__file__).with_name("ecz.schema.json")

DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
          "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
ROLES_BREAKDOWN = {"values": "dense", "indices": "indices", "codebook": "codebooks", "positions": "positions",
                   "graph": "graph"}


# ---- the header (its JSON Schema is ecz.schema.json) ------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Size = Annotated[int, Field(ge=0, le=1 << 40)]


class Stream(_Strict):
    """A run of bytes in the payload. ``count`` is the number of decoded items (bytes for the graph,
    elements for floats, symbols for symbol streams); symbols are < ``alphabet``."""

    role: Literal["graph", "values", "indices", "codebook", "positions"]
    codec: Literal["raw", "bits", "zstd", "ans"]
    offset: Size
    length: Size
    count: Size
    dtype: Literal["float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
                   "symbols", "bytes"]
    alphabet: Annotated[int, Field(ge=1, le=MAX_ALPHABET)] | None = None


class Tensor(_Strict):
    """One ONNX initializer, in graph order."""

    name: str = Field(max_length=4096)
    dtype: Literal["float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_DIMS)
    encoding: Literal["dense", "quant", "codebook", "sparse"]
    positions: Literal["bitmap", "relative"] | None = None
    gap_bits: Annotated[int, Field(ge=1, le=16)] | None = None
    values: Literal["dense", "quant", "codebook"] | None = None
    scale: float | None = None
    qmin: Annotated[int, Field(ge=-(1 << 24), le=1 << 24)] | None = None
    streams: list[Stream] = Field(max_length=4)


class Header(_Strict):
    """The ``.ecz`` header: the weight-free ONNX graph and the tensors to put back into it."""

    producer: str = Field(max_length=256)
    graph: Stream
    tensors: list[Tensor] = Field(max_length=1 << 20)


def schema() -> dict[str, Any]:
    """The JSON Schema of the header (shipped as ecz.schema.json)."""
    return Header.model_json_schema()


def write_schema(path: str | os.PathLike = SCHEMA_PATH) -> None:
    Path(path).write_text(json.dumps(schema(), indent=2, sort_keys=True) + "\n")


# ---- symbol and float coding --------------------------------------------------------------------

def _width(alphabet: int) -> int:
    return max(1, math.ceil(math.log2(alphabet))) if alphabet > 1 else 1


def _word_dtype(alphabet: int):
    return np.dtype("<u1") if alphabet <= 256 else np.dtype("<u2")


def pack_bits(sym: np.ndarray, bits: int) -> bytes:
    """Symbols as ``bits``-bit fields, least significant bit first, padded to a whole byte."""
    b = ((sym.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(b.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    if len(data) != (count * bits + 7) // 8:
        raise ArtifactError(f"a bit-packed stream has {len(data)} bytes; {count} symbols of {bits} bits need "
                            f"{(count * bits + 7) // 8}")
    b = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little", count=count * bits).reshape(count, bits)
    return (b.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        while True:
            byte = v & 0x7F
            v >>= 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_varints(data: bytes, n: int) -> tuple[list[int], int]:
    values, pos = [], 0
    for _ in range(n):
        v = shift = 0
        while True:
            if pos >= len(data) or shift > 35:
                raise ArtifactError("an ans stream's symbol counts are truncated or too large")
            byte = data[pos]
            pos += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(v)
    return values, pos


def _categorical(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def ans_encode(sym: np.ndarray, alphabet: int) -> bytes:
    """rANS with a static model from the symbol counts, which are stored first (LEB128)."""
    import constriction

    counts = np.bincount(sym, minlength=alphabet).astype(np.float64)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(sym.astype(np.int32), _categorical(counts))
    return _varints(counts.astype(np.int64)) + coder.get_compressed().astype("<u4").tobytes()


def _foreign(e: BaseException) -> bool:
    """Errors a decoding library raises on bad input (pyo3 panics derive from BaseException)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def ans_decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
    import constriction

    if alphabet < 2:
        raise ArtifactError("an ans stream needs an alphabet of at least 2 symbols")
    counts, pos = _read_varints(data, alphabet)
    if sum(counts) != count:
        raise ArtifactError(f"an ans stream counts {sum(counts)} symbols; the header says {count}")
    words = data[pos:]
    if len(words) % 4:
        raise ArtifactError("an ans stream is not a whole number of 32-bit words")
    if count == 0:
        return np.zeros(0, np.uint32)
    c = np.asarray(counts, dtype=np.float64)
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, "<u4").astype(np.uint32))
        sym = coder.decode(_categorical(c), count)
        empty = coder.is_empty()
    except BaseException as e:
        if not _foreign(e):
            raise
        raise ArtifactError(f"an ans stream does not decode: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    if not empty or not np.array_equal(np.bincount(sym, minlength=alphabet), c.astype(np.int64)):
        raise ArtifactError(f"an ans stream does not decode to the {count} symbols its header declares")
    return sym.astype(np.uint32)


def zstd_encode(data: bytes) -> bytes:
    import zstandard

    level = ZSTD_LEVEL if len(data) <= 1 << 17 else ZSTD_LEVEL_LARGE
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decode(data: bytes, size: int) -> bytes:
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"a zstd stream is corrupt: {e}") from None
    if declared != size:
        raise ArtifactError(f"a zstd stream holds {declared} bytes; the header says {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"a zstd stream is corrupt: {e}") from None
    if len(out) != size:
        raise ArtifactError(f"a zstd stream decodes to {len(out)} bytes; the header says {size}")
    return out


@dataclass
class Encoded:
    """A stream ready to write: its header fields and its bytes."""

    role: str
    codec: str
    data: bytes
    count: int
    dtype: str
    alphabet: int | None = None

    def header(self, offset: int) -> Stream:
        return Stream(role=self.role, codec=self.codec, offset=offset, length=len(self.data), count=self.count,
                      dtype=self.dtype, alphabet=self.alphabet)


def encode_symbols(role: str, sym: np.ndarray, alphabet: int) -> Encoded:
    """The smallest of bit-packed, zstd and ans for one symbol stream."""
    sym = np.ascontiguousarray(sym, dtype=np.uint32)
    n = int(sym.size)
    options = [("bits", pack_bits(sym, _width(alphabet)))]
    if n:
        options.append(("zstd", zstd_encode(sym.astype(_word_dtype(alphabet)).tobytes())))
    if n and alphabet > 1:
        options.append(("ans", ans_encode(sym, alphabet)))
    codec, data = min(options, key=lambda o: len(o[1]))
    return Encoded(role, codec, data, n, "symbols", alphabet)


def encode_floats(role: str, values: np.ndarray) -> Encoded:
    raw = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes()
    options = [("raw", raw)]
    if raw:
        options.append(("zstd", zstd_encode(raw)))
    codec, data = min(options, key=lambda o: len(o[1]))
    return Encoded(role, codec, data, int(values.size), values.dtype.name)


def decode_stream(s: Stream, payload: memoryview) -> np.ndarray | bytes:
    data = bytes(payload[s.offset:s.offset + s.length])
    if s.dtype == "symbols":
        alphabet = s.alphabet or 0
        if alphabet < 1:
            raise ArtifactError(f"a {s.role} stream of symbols has no alphabet")
        if s.codec == "bits":
            sym = unpack_bits(data, s.count, _width(alphabet))
        elif s.codec == "zstd":
            word = _word_dtype(alphabet)
            sym = np.frombuffer(zstd_decode(data, s.count * word.itemsize), word).astype(np.uint32)
        elif s.codec == "ans":
            sym = ans_decode(data, s.count, alphabet)
        else:
            raise ArtifactError(f"a {s.role} stream of symbols cannot use codec {s.codec}")
        if sym.size and int(sym.max()) >= alphabet:
            raise ArtifactError(f"a {s.role} stream has symbol {int(sym.max())}, outside its alphabet of {alphabet}")
        return sym
    width = 1 if s.dtype == "bytes" else np.dtype(DTYPES[s.dtype]).itemsize
    if s.codec == "raw":
        raw = data
    elif s.codec == "zstd":
        raw = zstd_decode(data, s.count * width)
    else:
        raise ArtifactError(f"a {s.role} stream of {s.dtype} cannot use codec {s.codec}")
    if len(raw) != s.count * width:
        raise ArtifactError(f"a {s.role} stream holds {len(raw)} bytes; {s.count} items of {s.dtype} need "
                            f"{s.count * width}")
    if s.dtype == "bytes":
        return raw
    return np.frombuffer(raw, np.dtype(DTYPES[s.dtype]).newbyteorder("<")).astype(DTYPES[s.dtype])


# ---- value encodings (exact) --------------------------------------------------------------------

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


# ---- tensors back from streams ------------------------------------------------------------------

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


# ---- files ----------------------------------------------------------------------------------------

@dataclass
class Packed:
    """What was written: total bytes and where they went."""

    path: Path | None
    size: int
    breakdown: dict[str, int] = field(default_factory=dict)
    encodings: dict[str, str] = field(default_factory=dict)


def _graph_bytes(model) -> tuple[bytes, list[tuple[str, np.ndarray]]]:
    """The model's graph without its initializers or doc strings, and the initializers in order."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    tensors, kept = [], []
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.name in DTYPES and t.data_location != onnx.TensorProto.EXTERNAL:
            tensors.append((t.name, a))
        else:  # types .ecz does not encode (e.g. 4-bit) stay inside the graph, as ONNX stores them
            kept.append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    m.doc_string = ""
    m.graph.doc_string = ""
    for node in m.graph.node:
        node.doc_string = ""
    return m.SerializeToString(), tensors


def encode(model) -> tuple[bytes, Packed]:
    """The ``.ecz`` bytes of an ONNX ``ModelProto`` and the byte breakdown."""
    from ..version import __version__

    graph, tensors = _graph_bytes(model)
    g = Encoded("graph", "raw", graph, len(graph), "bytes")
    gz = zstd_encode(graph)
    if len(gz) < len(graph):
        g = Encoded("graph", "zstd", gz, len(graph), "bytes")
    chunks, offset = [g.data], len(g.data)
    graph_stream = g.header(0)
    entries, breakdown, encodings = [], {"header": 0, "graph": len(g.data)}, {}
    for name, arr in tensors:
        arr = np.asarray(arr, order="C")  # keeps 0-d tensors 0-d
        best = min(tensor_candidates(arr), key=lambda c: c.size)
        streams = []
        for s in best.streams:
            streams.append(s.header(offset))
            chunks.append(s.data)
            offset += len(s.data)
            key = ROLES_BREAKDOWN[s.role]
            breakdown[key] = breakdown.get(key, 0) + len(s.data)
        entries.append(Tensor(name=name, dtype=arr.dtype.name, shape=list(arr.shape), streams=streams, **best.fields))
        encodings[name] = describe_encoding(entries[-1])
    header = Header(producer=f"edgecompress {__version__}", graph=graph_stream, tensors=entries)
    payload = b"".join(chunks)
    data = assemble(header.model_dump_json(exclude_none=True).encode(), payload)
    breakdown["header"] = len(data) - len(payload)
    got = decode(data)
    for (name, arr), back in zip(tensors, got.tensors.values()):
        if arr.dtype != back.dtype or arr.shape != back.shape or arr.tobytes() != back.tobytes():
            raise RuntimeError(f"internal error: tensor {name!r} did not decode bit-exactly")
    return data, Packed(None, len(data), breakdown, encodings)


def assemble(header_json: bytes, payload: bytes, version: int = VERSION) -> bytes:
    """Prefix, header (zstd-compressed when that is smaller) and payload, with the checksum."""
    flags, stored = 0, header_json
    packed = zstd_encode(header_json)
    if len(packed) < len(header_json):
        flags, stored = FLAG_ZSTD_HEADER, packed
    body = stored + payload
    return PREFIX.pack(MAGIC, version, flags, len(stored), zlib.crc32(body)) + body


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and the payload of a well-formed file (for tools and tests)."""
    _, _, flags, hlen, _ = PREFIX.unpack_from(data)
    raw = data[PREFIX.size:PREFIX.size + hlen]
    if flags & FLAG_ZSTD_HEADER:
        import zstandard
        raw = zstandard.ZstdDecompressor().decompress(raw)
    return json.loads(raw), data[PREFIX.size + hlen:]


def describe_encoding(t: Tensor) -> str:
    parts = [t.encoding]
    if t.encoding == "sparse":
        parts.append(f"{t.positions}" + (f" {t.gap_bits}-bit gaps" if t.gap_bits else ""))
        parts.append(f"values {t.values}")
    parts.append("/".join(f"{s.role}:{s.codec}" for s in t.streams))
    return " ".join(parts)


def pack(model, path: str | os.PathLike) -> Packed:
    """Write ``model`` (an ONNX ModelProto or a path to an .onnx file) as ``path`` (atomically)."""
    import onnx

    if not hasattr(model, "graph"):
        model = onnx.load(str(model))
    data, info = encode(model)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    info.path = Path(path)
    return info


@dataclass
class Decoded:
    header: Header
    graph: Any  # onnx.ModelProto without initializers
    tensors: dict[str, np.ndarray]

    def model(self):
        """The ONNX model with its initializers put back."""
        import onnx
        from onnx import numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(self.graph)
        m.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.tensors.items())
        return m


def read_header(data: bytes) -> tuple[Header, memoryview]:
    """The validated header and the payload of an ``.ecz`` file's bytes."""
    if len(data) < PREFIX.size:
        if not MAGIC.startswith(bytes(data[:4])) or not data:
            raise ArtifactError(f"not an .ecz file: it starts with {bytes(data[:4])!r}, not {MAGIC!r}")
        raise ArtifactError(f"truncated .ecz file: {len(data)} bytes, shorter than its {PREFIX.size}-byte prefix")
    magic, version, flags, hlen, crc = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError(f"not an .ecz file: it starts with {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise ArtifactError(f".ecz version must be {VERSION}; got {version} (written by a newer edgecompress?)"
                            if version > VERSION else f".ecz version must be {VERSION}; got {version}")
    if flags & ~FLAG_ZSTD_HEADER:
        raise ArtifactError(f".ecz flags must be 0 or 1; got {flags}")
    body = memoryview(data)[PREFIX.size:]
    if hlen > len(body):
        raise ArtifactError(f"truncated .ecz file: the header needs {hlen} bytes; {len(body)} remain")
    raw = bytes(body[:hlen])
    if flags & FLAG_ZSTD_HEADER:
        import zstandard

        try:
            size = zstandard.frame_content_size(raw)
        except zstandard.ZstdError as e:
            raise ArtifactError(f".ecz header is corrupt: {e}") from None
        if size < 0 or size > min(MAX_HEADER, EXPANSION * len(data)):
            raise ArtifactError(f".ecz header declares {size} bytes decompressed; at most "
                                f"{min(MAX_HEADER, EXPANSION * len(data))} are allowed")
        raw = zstd_decode(raw, size)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f".ecz header is not JSON: {str(e).splitlines()[0][:120]}") from None
    try:
        header = Header.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ArtifactError(f".ecz header.{where}: {first['msg'].lower()[:160]}") from None
    payload = body[hlen:]
    check_sizes(header, len(payload), len(data))
    if zlib.crc32(body) != crc:
        raise ArtifactError(".ecz checksum mismatch: the file is corrupt")
    return header, payload


def check_sizes(header: Header, payload_size: int, file_size: int) -> None:
    """Refuse offsets past the end and shapes too large for the file before allocating anything."""
    limit = EXPANSION * file_size
    total = 0
    streams = [("graph", header.graph)] + [(t.name, s) for t in header.tensors for s in t.streams]
    for owner, s in streams:
        if s.offset + s.length > payload_size:
            raise ArtifactError(f"truncated .ecz file: stream {s.role} of {owner!r} ends at byte "
                                f"{s.offset + s.length} of a payload of {payload_size}")
        if s.count > limit:
            raise ArtifactError(f".ecz stream {s.role} of {owner!r} declares {s.count} items; a file of "
                                f"{file_size} bytes may hold at most {limit}")
    for t in header.tensors:
        numel = 1
        for d in t.shape:
            numel *= d
            if numel > MAX_ELEMENTS:
                raise ArtifactError(f".ecz tensor {t.name!r} has shape {t.shape}, more than {MAX_ELEMENTS} elements")
        total += numel
        if total > limit:
            raise ArtifactError(f".ecz tensors declare {total} elements; a file of {file_size} bytes may hold "
                                f"at most {limit}")


def decode(data: bytes) -> Decoded:
    """Check and decode ``.ecz`` bytes into the weight-free graph and the tensors (bit-exact)."""
    import onnx
    from google.protobuf.message import DecodeError

    header, payload = read_header(data)
    if header.graph.role != "graph" or header.graph.dtype != "bytes":
        raise ArtifactError(".ecz header.graph must be a graph stream of bytes")
    graph_bytes = decode_stream(header.graph, payload)
    try:
        graph = onnx.load_from_string(graph_bytes)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as e:
        raise ArtifactError(f".ecz graph is not an ONNX model: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    tensors: dict[str, np.ndarray] = {}
    for t in header.tensors:
        if t.name in tensors:
            raise ArtifactError(f".ecz tensor {t.name!r} appears twice")
        tensors[t.name] = decode_tensor(t, payload)
    return Decoded(header, graph, tensors)


def read(path: str | os.PathLike) -> Decoded:
    """Decode an ``.ecz`` file; a bad file gives one line naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        return decode(path.read_bytes())
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def breakdown(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of an ``.ecz`` file by purpose: header, graph, positions, indices, codebooks, dense."""
    data = Path(path).read_bytes()
    try:
        header, _ = read_header(data)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    out = {"header": len(data) - sum(s.length for t in header.tensors for s in t.streams) - header.graph.length,
           "graph": header.graph.length}
    for t in header.tensors:
        for s in t.streams:
            key = ROLES_BREAKDOWN[s.role]
            out[key] = out.get(key, 0) + s.length
    return out


def unpack(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the ONNX model inside an ``.ecz`` file to ``out`` (atomically)."""
    model = read(path).model()
    return write_atomic(out, lambda tmp: tmp.write_bytes(model.SerializeToString()))


class OrtModule(nn.Module):
    """A runnable model from an ``.ecz`` file: ONNX Runtime on the decoded ONNX model. Calling it
    with a torch tensor returns a torch tensor; ``onnx_bytes`` is the decoded ONNX model."""

    def __init__(self, onnx_bytes: bytes, threads: int = 1):
        from .onnx import session

        super().__init__()
        self.onnx_bytes = onnx_bytes
        self.session = session(onnx_bytes, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.session.get_inputs()[0].name
        out = self.session.run(None, {name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


def load(path: str | os.PathLike, threads: int = 1) -> OrtModule:
    """A runnable model from an ``.ecz`` file (no pickle: a JSON header, ONNX and raw numbers)."""
    args.path("load", path)
    return OrtModule(read(path).model().SerializeToString(), threads)
