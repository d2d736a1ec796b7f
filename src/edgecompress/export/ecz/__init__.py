"""The packed ``.ecz`` artifact: an ONNX graph without its weights, and every weight tensor in the
smallest exact encoding found for it. Read top-down:

- ``header``: the prefix, the limits and the header's JSON Schema (shipped as ``ecz.schema.json``);
- ``streams``: how a stream of symbols or floats is stored (bit-packed, zstd, rANS, raw);
- ``tensors``: every exact encoding of one tensor (dense, quant, codebook, sparse) and its decoding;
- ``writer``: ``pack`` and ``encode``;
- ``reader``: ``read``, ``unpack``, ``breakdown`` and ``load`` (a runnable model on ONNX Runtime).
"""
from .header import PREFIX, SCHEMA_PATH, Header, schema, write_schema
from .reader import Decoded, OrtModule, breakdown, decode, load, read, read_header, split, unpack
from .writer import Packed, assemble, encode, pack

__all__ = ["PREFIX", "SCHEMA_PATH", "Decoded", "Header", "OrtModule", "Packed", "assemble", "breakdown", "decode",
           "encode", "load", "pack", "read", "read_header", "schema", "split", "unpack", "write_schema"]
