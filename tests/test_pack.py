"""The packed .ecz artifact: exact round trips, pinned bytes, hostile files."""
from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
import zlib

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import edgecompress as ec
from edgecompress.cli import app
from edgecompress.export import ecz
from edgecompress.export.onnx import export_onnx


def tiny_model() -> onnx.ModelProto:
    """y = x W^T + b with a 4x6 weight of 3 shared values and 50% zeros, and a float16-exact bias."""
    w = np.array([[0, 0.53, 0, -0.29, 0, 0.53], [0.11, 0, 0, 0, 0.53, 0], [0, 0, -0.29, 0, 0, 0.11],
                  [0.53, 0.53, 0, 0, 0, -0.29]], dtype=np.float32)
    b = np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float16).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test", ir_version=8)


def medium_model() -> onnx.ModelProto:
    """Two layers whose tensors pick ans, zstd, bitmap and plain streams (for the fuzz test)."""
    g = np.random.default_rng(0)
    book = np.float32([-0.75, -0.1, 0.2, 0.9, 0.33, -0.41])
    w = np.where(g.random((64, 300)) < 0.96, 0, book[g.integers(0, 6, (64, 300))]).astype(np.float32)
    w2 = np.where(g.random((10, 64)) < 0.5, 0, book[g.integers(0, 6, (10, 64))]).astype(np.float32)
    b = np.tile(g.standard_normal(8).astype(np.float32), 8)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "medium", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                              [numpy_helper.from_array(a, n) for n, a in (("w", w), ("b", b), ("w2", w2))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def medium() -> bytes:
    data, info = ecz.encode(medium_model())
    codecs = " ".join(info.encodings.values())
    assert all(c in codecs for c in (":ans", ":zstd", "bitmap", ":raw")), codecs
    return data


@pytest.fixture(scope="module")
def tiny() -> bytes:
    data, _ = ecz.encode(tiny_model())
    return data


def test_tiny_artifact_bytes_are_pinned(tiny):
    assert len(tiny) == 447
    assert hashlib.sha256(tiny).hexdigest()[:16] == "14127f40847672af"


def test_tiny_artifact_round_trips_and_runs(tiny):
    d = ecz.decode(tiny)
    ref = {t.name: numpy_helper.to_array(t) for t in tiny_model().graph.initializer}
    assert list(d.tensors) == ["w", "b"]
    for name, a in ref.items():
        assert d.tensors[name].dtype == a.dtype and d.tensors[name].tobytes() == a.tobytes()
    assert [t.encoding for t in d.header.tensors] == ["sparse", "dense"]
    from edgecompress.export.onnx import session
    x = np.ones((2, 6), np.float32)
    y = session(d.model().SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(y, x @ ref["w"].T + ref["b"])


def test_every_candidate_encoding_decodes_bit_exactly():
    g = np.random.default_rng(0)
    book = np.float32([-0.75, -0.1, 0.2, 0.9])
    cases = {
        "fp32": g.standard_normal((7, 9)).astype(np.float32),
        "fp16": g.standard_normal((5, 5)).astype(np.float16).astype(np.float32),
        "int8 grid": (g.integers(-127, 128, (8, 8)).astype(np.float32) * np.float32(0.0123)),
        "shared+sparse": np.where(g.random((40, 50)) < 0.9, 0, book[g.integers(0, 4, (40, 50))]).astype(np.float32),
        "negzero": np.array([0.0, -0.0, 1.5, 0.0], np.float32),
        "zeros": np.zeros((3, 3), np.float32),
        "int64": np.array([1, -2, 3], np.int64),
        "int8": np.random.default_rng(1).integers(-128, 128, (30, 30)).astype(np.int8),
    }
    seen = set()
    for label, arr in cases.items():
        for cand in ecz.tensors.tensor_candidates(arr):
            streams, offset, chunks = [], 0, []
            for s in cand.streams:
                streams.append(s.header(offset))
                chunks.append(s.data)
                offset += len(s.data)
            t = ecz.header.Tensor(name=label, dtype=arr.dtype.name, shape=list(arr.shape), streams=streams,
                                  **cand.fields)
            back = ecz.tensors.decode_tensor(t, memoryview(b"".join(chunks)))
            assert back.dtype == arr.dtype and back.tobytes() == arr.tobytes(), (label, cand.fields)
            seen.add((cand.fields["encoding"], cand.fields.get("values"), cand.fields.get("positions")))
    assert {"dense", "quant", "codebook"} <= {e for e, _, _ in seen}
    assert {p for e, _, p in seen if e == "sparse"} == {"bitmap", "relative"}
    assert {v for e, v, _ in seen if e == "sparse"} >= {"codebook", "dense"}
    assert ecz.tensors.quant_grid(cases["int8 grid"]) is not None


@pytest.mark.parametrize("gap_bits", [1, 2, 3, 5, 8, 12])
def test_relative_positions_with_fillers(gap_bits):
    g = np.random.default_rng(gap_bits)
    nz = g.random(5000) < 0.01
    nz[0] = nz[-1] = True
    sym = ecz.tensors.relative_positions(nz, gap_bits)
    assert int(sym.max()) < 1 << gap_bits
    assert np.array_equal(ecz.tensors.decode_relative(sym, gap_bits, nz.size), np.flatnonzero(nz))


def test_model_weights_decode_bit_exactly_and_load_runs(task, tmp_path):
    t = task("digits-lenet300")
    m = t.fresh_model()
    with torch.no_grad():  # pruned and shared weights, like the cluster stage leaves them
        for p in m.parameters():
            if p.dim() > 1:
                keep = p.abs() > p.abs().quantile(0.9)
                p.copy_(torch.where(keep, torch.round(p * 64) / 64, torch.zeros_like(p)))
    export_onnx(m, t.example_input, tmp_path / "m.onnx")
    info = ecz.pack(tmp_path / "m.onnx", tmp_path / "m.ecz")
    assert info.size == (tmp_path / "m.ecz").stat().st_size == sum(info.breakdown.values())
    decoded = ecz.read(tmp_path / "m.ecz").tensors
    for name, p in m.named_parameters():
        assert np.array_equal(decoded[name].view(np.uint32), p.detach().numpy().view(np.uint32)), name
    assert info.encodings["fc1.weight"].startswith("sparse")
    loaded = ec.load(tmp_path / "m.ecz")
    x = torch.cat([x for x, _ in t.eval_data])
    assert torch.allclose(loaded(x), m(x), atol=1e-4)


def test_cli_unpack_and_eval(task, tmp_path):
    t = task("digits-lenet300")
    export_onnx(t.model, t.example_input, tmp_path / "m.onnx")
    ecz.pack(tmp_path / "m.onnx", tmp_path / "m.ecz")
    r = CliRunner().invoke(app, ["unpack", str(tmp_path / "m.ecz"), "-o", str(tmp_path / "back.onnx")])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(tmp_path / "back.onnx"))
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "m.ecz"), "--task", "digits-lenet300", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["stored_bytes"] == (tmp_path / "m.ecz").stat().st_size and m["artifact"] == "ecz"
    # the .ecz holds the ONNX file's weights bit for bit: ONNX Runtime scores both alike, exactly
    assert m["metric"] == ec.measure(tmp_path / "m.onnx", t, latency=False).metric
    # against torch's scoring (another backend, on any machine's weights) a near-tie may flip: one test sample
    n = sum(len(y) for _, y in t.eval_data)
    assert abs(m["metric"] - ec.measure(t.model, t, latency=False).metric) <= 1 / n + 1e-9
    (tmp_path / "bad.ecz").write_bytes(b"PK\x03\x04" + bytes(20))
    r = CliRunner().invoke(app, ["unpack", str(tmp_path / "bad.ecz"), "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "not an .ecz file" in r.output and not (tmp_path / "x.onnx").exists()


def test_shipped_schema_is_the_header_model():
    assert json.loads(ecz.SCHEMA_PATH.read_text()) == json.loads(json.dumps(ecz.schema()))


# ---- hostile files: one line of ArtifactError, nothing large allocated -------------------------

def rewrite(data: bytes, edit) -> bytes:
    header, payload = ecz.split(data)
    edit(header)
    return ecz.assemble(json.dumps(header).encode(), payload)


def refuse(data: bytes) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(ec.ArtifactError) as e:
            ecz.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"refusing the file allocated {peak} bytes"
    message = str(e.value)
    assert "\n" not in message
    return message


def test_wrong_magic(tiny):
    assert refuse(b"GIF8" + tiny[4:]) == "not an .ecz file: it starts with b'GIF8', not b'\\x89ECZ'"


def test_version_from_the_future(tiny):
    data = tiny[:4] + bytes([2]) + tiny[5:]
    assert refuse(data) == ".ecz version must be 1; got 2 (written by a newer edgecompress?)"


def test_truncated(tiny):
    assert refuse(tiny[:10]) == "truncated .ecz file: 10 bytes, shorter than its 14-byte prefix"
    assert refuse(tiny[:-5]).startswith("truncated .ecz file: stream ")
    _, _, _, hlen, _ = ecz.PREFIX.unpack_from(tiny)
    assert refuse(tiny[:ecz.PREFIX.size + hlen - 1]) == \
        f"truncated .ecz file: the header needs {hlen} bytes; {hlen - 1} remain"


def test_header_lies_about_offsets(tiny):
    def far(h):
        h["tensors"][0]["streams"][0]["offset"] = 10 ** 9
    assert refuse(rewrite(tiny, far)).startswith("truncated .ecz file: stream positions of 'w' ends at byte 10000000")


def test_header_lies_about_sizes(tiny):
    def huge(h):
        h["tensors"][0]["streams"][0]["count"] = 10 ** 12
    assert "declares 1000000000000 items; a file of" in refuse(rewrite(tiny, huge))


def test_shape_product_overflows(tiny):
    def overflow(h):
        h["tensors"][0]["shape"] = [2 ** 40, 2 ** 40, 2 ** 40]
    assert refuse(rewrite(tiny, overflow)) == \
        ".ecz tensor 'w' has shape [1099511627776, 1099511627776, 1099511627776], more than 2147483648 elements"


def test_payload_decodes_to_the_wrong_length(tiny):
    def longer(h):
        h["graph"]["count"] += 1
    assert "a " in refuse(rewrite(tiny, longer)) and "the header says" in refuse(rewrite(tiny, longer))

    def shape(h):
        h["tensors"][0]["shape"] = [4, 5]
    assert refuse(rewrite(tiny, shape)) == \
        "tensor 'w': a bitmap needs 20 symbols of alphabet 2"


def test_corrupt_payload_fails_the_checksum(tiny):
    data = bytearray(tiny)
    data[-1] ^= 0xFF
    assert refuse(bytes(data)) == ".ecz checksum mismatch: the file is corrupt"


def test_header_not_json_and_wrong_fields(tiny):
    _, payload = ecz.split(tiny)
    assert refuse(ecz.assemble(b"{nope", payload)).startswith(".ecz header is not JSON: ")
    bad = ecz.assemble(json.dumps({"producer": "x", "graph": {}, "tensors": [], "extra": 1}).encode(), payload)
    assert refuse(bad).startswith(".ecz header.")


def fix_crc(data: bytes) -> bytes:
    if len(data) < ecz.PREFIX.size:
        return data
    magic, version, flags, hlen, _ = ecz.PREFIX.unpack_from(data)
    body = data[ecz.PREFIX.size:]
    return ecz.PREFIX.pack(magic, version, flags, hlen, zlib.crc32(body)) + body


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 10 ** 6), crc=st.booleans(), use_header=st.booleans())
def test_fuzz_mutated_files_only_raise_artifact_error(tiny, medium, edits, cut, crc, use_header):
    original = medium if cut % 2 else tiny
    if use_header:  # mutate the uncompressed JSON header, to reach the checks behind it
        header, payload = ecz.split(original)
        text = bytearray(json.dumps(header).encode())
        for pos, byte in edits:
            text[pos % len(text)] = byte
        data = bytearray(ecz.assemble(bytes(text), payload))
    else:
        data = bytearray(original)
        for pos, byte in edits:
            data[pos % len(data)] = byte
    data = bytes(data[:cut % (len(data) + 1)] if cut % 7 == 0 else data)
    try:
        ecz.decode(fix_crc(data) if crc else data)
    except ec.ArtifactError as e:
        assert "\n" not in str(e)
