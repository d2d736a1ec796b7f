"""Reading ``.ecz``: the ONNX model back, bit-exact, and a runnable model on ONNX Runtime.

Reading never trusts the file: sizes, offsets, shapes and decoded lengths are checked before
anything is allocated, and every failure is one line of ``ArtifactError``.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from ... import args
from ...errors import ArtifactError
from ...files import write_atomic
from .header import (EXPANSION, FLAG_ZSTD_HEADER, MAGIC, MAX_ELEMENTS, MAX_HEADER, PREFIX, ROLES_BREAKDOWN, VERSION,
                     Header)
from .streams import decode_stream, zstd_decode
from .tensors import decode_tensor


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


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and the payload of a well-formed file (for tools and tests)."""
    _, _, flags, hlen, _ = PREFIX.unpack_from(data)
    raw = data[PREFIX.size:PREFIX.size + hlen]
    if flags & FLAG_ZSTD_HEADER:
        import zstandard
        raw = zstandard.ZstdDecompressor().decompress(raw)
    return json.loads(raw), data[PREFIX.size + hlen:]


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
        from ..onnx import session

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
