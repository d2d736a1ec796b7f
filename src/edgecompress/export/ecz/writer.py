"""Writing ``.ecz``: an ONNX model's graph without its weights, then each weight tensor in its smallest
exact encoding, checked to decode bit-exactly before the file is written (atomically)."""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...files import write_atomic
from ...version import __version__
from .header import DTYPES, FLAG_ZSTD_HEADER, MAGIC, PREFIX, ROLES_BREAKDOWN, VERSION, Header, Tensor
from .reader import decode
from .streams import Encoded, zstd_encode
from .tensors import describe_encoding, tensor_candidates


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


def pack(model, path: str | os.PathLike) -> Packed:
    """Write ``model`` (an ONNX ModelProto or a path to an .onnx file) as ``path`` (atomically)."""
    import onnx

    if not hasattr(model, "graph"):
        model = onnx.load(str(model))
    data, info = encode(model)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    info.path = Path(path)
    return info
