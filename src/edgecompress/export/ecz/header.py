"""The ``.ecz`` format: the fixed prefix, the limits a reader enforces, and the header's schema.

Layout (all integers little-endian)::

    magic    4 bytes  b"\\x89ECZ"
    version  1 byte   1
    flags    1 byte   bit 0: the header is zstd-compressed
    hlen     4 bytes  length of the header as stored
    crc32    4 bytes  CRC-32 of everything after these 14 bytes (checked after the header)
    header   hlen bytes: JSON described by ecz.schema.json (``Header`` below)
    payload  the streams the header points at (offsets relative to the payload's start)
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


MAGIC = b"\x89ECZ"
VERSION = 1
PREFIX = struct.Struct("<4sBBII")  # magic, version, flags, header length, crc32
FLAG_ZSTD_HEADER = 1
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 31           # per tensor
EXPANSION = 1 << 12              # decoded elements per byte of file, at most
MAX_HEADER = 1 << 24             # decompressed header bytes
MAX_ALPHABET = 1 << 16
SCHEMA_PATH = Path(__file__).with_name("ecz.schema.json")
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
          "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
ROLES_BREAKDOWN = {"values": "dense", "indices": "indices", "codebook": "codebooks", "positions": "positions",
                   "graph": "graph"}


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
