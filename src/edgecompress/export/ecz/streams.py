"""Streams of the payload: symbols bit-packed, zstd-compressed or rANS-coded (through constriction),
and floats raw or zstd-compressed; each written as the smallest of its options."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import ArtifactError
from .header import DTYPES, Stream


ZSTD_LEVEL = 19                  # streams up to 128 KiB
ZSTD_LEVEL_LARGE = 9             # larger streams (level 19 costs seconds there and saves little)


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
