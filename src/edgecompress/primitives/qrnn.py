"""Recurrent layers with int8 weights.

``QuantLSTM``: an ``nn.LSTM`` whose input and recurrent weights (W, R) are int8, symmetric, per
gate row or per tensor, while the input sequence and the hidden state are quantized to uint8 at
run time. Its forward pass computes what ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` does
(onnxruntime ``rnn_helpers.cc`` ``ComputeGemm`` for uint8 weights, ``uni_directional_lstm.cc``):

* ``X @ W^T`` is one product for the whole sequence: all ``T * B`` input rows share one uint8
  scale and zero point (``DynamicQuantizeLinear``'s rule: range widened to hold 0, scale
  ``(max - min) / 255``, zero point rounded half to even);
* at every step ``H_{t-1} @ R^T`` quantizes the batch's hidden state with its own scale and zero
  point (one thread: ONNX Runtime splits the batch into one chunk per intra-op thread);
* the int32 sums are scaled by ``input scale * weight scale`` and added, then the summed bias
  ``Wb + Rb``; gates in ONNX order (i, o, f, c): ``c = f * c + i * tanh(g)``, ``h = o * tanh(c)``.

Weights are held in ONNX gate order, one tensor per layer for all directions, shape
``(directions * 4H, K)``; the file stores them transposed per direction as ``[directions, K, 4H]``
(the layout ``onnxruntime.quantization.quantize_dynamic`` writes) with scales
``[directions, 4H]`` (per gate row) or ``[directions]`` (per tensor).

``QuantGRU`` / ``QuantRNN``: ONNX Runtime has no integer GRU or RNN kernel. Their weights are
stored as int8 and dequantized inside the graph (``DequantizeLinear`` feeding a float ``GRU`` /
``RNN``): the file is about 4x smaller, the compute stays float.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from . import quant as Q
from .quant import QuantSpec

#: torch's gate chunks in ONNX order: LSTM (i, f, g, o) -> (i, o, f, c); GRU (r, z, n) -> (z, r, h)
GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}


def _c(t: torch.Tensor) -> torch.Tensor:
    """A copy the ONNX tracer sees as a constant."""
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def to_onnx_gates(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of a torch weight or bias (gates stacked along dim 0) in ONNX gate order."""
    order = GATE_ORDER[kind]
    chunks = w.chunk(len(order), dim=0)
    return torch.cat([chunks[i] for i in order], dim=0)


def to_torch_gates(w: torch.Tensor, kind: str) -> torch.Tensor:
    order = GATE_ORDER[kind]
    chunks = w.chunk(len(order), dim=0)
    inverse = [order.index(i) for i in range(len(order))]
    return torch.cat([chunks[i] for i in inverse], dim=0)


def dynamic_matmul(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x (M, K) @ dequant(q (N, K))^T`` as ONNX Runtime's uint8 x int8 GEMM computes it: ``x`` to
    uint8 with one run-time scale and zero point, exact integer sums, then ``sum * (x scale * w scale)``."""
    s, z = Q.dynamic_params(x)
    xq = torch.clamp(torch.round(x / s) + z, 0, 255) - z
    acc = (xq.double() @ q.double().t()).float()
    return acc * (s * w_scale)


def lstm_direction(gx: torch.Tensor, rq: torch.Tensor, r_scale: torch.Tensor, bias: torch.Tensor,
                   h: torch.Tensor, c: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction of DynamicQuantizeLSTM given ``gx = X @ W^T`` (T, B, 4H) already computed."""
    hidden = h.shape[-1]
    steps = range(gx.shape[0] - 1, -1, -1) if reverse else range(gx.shape[0])
    ys = [None] * gx.shape[0]
    for t in steps:
        g = gx[t] + dynamic_matmul(h, rq, r_scale)
        g = g + bias
        i, o, f, cc = g.split(hidden, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cc)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys[t] = h
    return torch.stack(ys), h, c


def dynamic_lstm(x: torch.Tensor, wq: torch.Tensor, rq: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
                 c0: torch.Tensor | None, w_scale: torch.Tensor, r_scale: torch.Tensor,
                 hidden: int, directions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLSTM on ``x`` (T, B, K): ``wq`` (D, K, 4H) and ``rq`` (D, H, 4H) int8 as in the
    file, ``b`` (D, 8H), scales (D,) or (D, 4H). Returns Y (T, D, B, H), Y_h and Y_c (D, B, H)."""
    t_len, batch, k = x.shape
    ys, hs, cs = [], [], []
    for d in range(directions):
        ws = w_scale[d]
        rs = r_scale[d]
        gx = dynamic_matmul(x.reshape(t_len * batch, k), wq[d].t(), ws).reshape(t_len, batch, 4 * hidden)
        bias = b[d, :4 * hidden] + b[d, 4 * hidden:]
        h = torch.zeros(batch, hidden) if h0 is None else h0[d]
        c = torch.zeros(batch, hidden) if c0 is None else c0[d]
        y, h, c = lstm_direction(gx, rq[d].t(), rs, bias, h, c, reverse=d == 1)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, dim=1), torch.stack(hs), torch.stack(cs)


def float_rnn(kind: str, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
              hidden: int, directions: int, nonlinearity: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX ``GRU`` (linear_before_reset = 1, torch's form) or ``RNN`` in float: ``w`` (D, G*H, K),
    ``r`` (D, G*H, H), ``b`` (D, 2*G*H), gates in ONNX order. Returns Y (T, D, B, H) and Y_h (D, B, H)."""
    t_len, batch, _ = x.shape
    g = len(GATE_ORDER[kind]) * hidden
    ys, hs = [], []
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    for d in range(directions):
        gx = x @ w[d].t() + b[d, :g]
        h = torch.zeros(batch, hidden) if h0 is None else h0[d]
        out = [None] * t_len
        for t in (range(t_len - 1, -1, -1) if d == 1 else range(t_len)):
            gh = h @ r[d].t() + b[d, g:]
            if kind == "GRU":
                z = torch.sigmoid(gx[t, :, :hidden] + gh[:, :hidden])
                rr = torch.sigmoid(gx[t, :, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
                n = torch.tanh(gx[t, :, 2 * hidden:] + rr * gh[:, 2 * hidden:])
                h = (1 - z) * n + z * h
            else:
                h = act(gx[t] + gh)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
    return torch.stack(ys, dim=1), torch.stack(hs)


# ---- export-only functions: forward is the computation, symbolic the ONNX form --------------

def _missing(g):
    """An omitted optional ONNX input."""
    from torch.onnx._internal.torchscript_exporter.symbolic_opset9 import unused
    return unused(g)


class _DynamicQuantizeLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, rq, b, h0, c0, w_scale, w_zp, r_scale, r_zp,  # type: ignore[override]
                hidden: int, direction: str):
        return dynamic_lstm(x, wq, rq, b, h0, c0, w_scale, r_scale, hidden, 2 if direction == "bidirectional" else 1)

    @staticmethod
    def symbolic(g, x, wq, rq, b, h0, c0, w_scale, w_zp, r_scale, r_zp, hidden, direction):
        h0 = _missing(g) if h0 is None else h0
        c0 = _missing(g) if c0 is None else c0
        outs = g.op("com.microsoft::DynamicQuantizeLSTM", x, wq, rq, b, _missing(g), h0, c0, _missing(g),
                    w_scale, w_zp, r_scale, r_zp, hidden_size_i=hidden, direction_s=direction, outputs=3)
        d = 2 if direction == "bidirectional" else 1
        for out, sizes in zip(outs, ([None, d, None, hidden], [d, None, hidden], [d, None, hidden])):
            out.setType(x.type().with_sizes(sizes))
        return outs


class _DequantRNN(torch.autograd.Function):
    """Float GRU / RNN whose W and R come from int8 codes through DequantizeLinear (axis 0)."""

    @staticmethod
    def forward(ctx, x, wq, w_scale, w_zp, rq, r_scale, r_zp, b, h0,  # type: ignore[override]
                kind: str, hidden: int, direction: str, nonlinearity: str):
        d = 2 if direction == "bidirectional" else 1
        w = _dequant(wq, w_scale, w_zp).reshape(d, -1, wq.shape[1])
        r = _dequant(rq, r_scale, r_zp).reshape(d, -1, rq.shape[1])
        return float_rnn(kind, x, w, r, b, h0, hidden, d, nonlinearity)

    @staticmethod
    def symbolic(g, x, wq, w_scale, w_zp, rq, r_scale, r_zp, b, h0, kind, hidden, direction, nonlinearity):
        d = 2 if direction == "bidirectional" else 1
        shape_w = g.op("Constant", value_t=torch.tensor([d, -1, wq.type().sizes()[1]], dtype=torch.int64))
        shape_r = g.op("Constant", value_t=torch.tensor([d, -1, rq.type().sizes()[1]], dtype=torch.int64))
        w = g.op("Reshape", g.op("DequantizeLinear", wq, w_scale, w_zp, axis_i=0), shape_w)
        r = g.op("Reshape", g.op("DequantizeLinear", rq, r_scale, r_zp, axis_i=0), shape_r)
        h0 = _missing(g) if h0 is None else h0
        if kind == "GRU":
            return g.op("GRU", x, w, r, b, _missing(g), h0, hidden_size_i=hidden, direction_s=direction,
                        linear_before_reset_i=1, outputs=2)
        acts = ["Tanh" if nonlinearity == "tanh" else "Relu"] * d
        return g.op("RNN", x, w, r, b, _missing(g), h0, hidden_size_i=hidden, direction_s=direction,
                    activations_s=acts, outputs=2)


def _dequant(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 0:
        return (q.float() - zp.float()) * scale
    return (q.float() - zp.float().reshape(-1, 1)) * scale.reshape(-1, 1)


# ---- the layer -------------------------------------------------------------------------------

class QuantRNNBase(nn.Module):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (no projections) with int8 weights, one ``QuantSpec``
    per weight tensor: ``weight_ih_l{k}`` (W) and ``weight_hh_l{k}`` (R) of every layer ``k``, over
    all directions, rows in ONNX gate order. The wrapped module keeps the dequantized weights."""

    kind = ""

    def __init__(self, rnn: nn.LSTM | nn.GRU | nn.RNN, w_spec: QuantSpec) -> None:
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError("LSTM with proj_size is not supported")
        self.rnn = rnn
        self.directions = 2 if rnn.bidirectional else 1
        self._w = w_spec
        with torch.no_grad():
            for k in range(rnn.num_layers):
                for key in ("ih", "hh"):
                    w = self._stacked(f"weight_{key}_l{k}")
                    spec = Q.calibrate(w, w_spec)
                    q = Q.quantize(w, spec).to(torch.int8)
                    self.register_buffer(f"{key}{k}_q", q)
                    self.register_buffer(f"{key}{k}_scale", spec.scale.clone())
                    self.register_buffer(f"{key}{k}_zp", spec.zero_point.to(torch.int8).clone())
                    deq = Q.dequantize(q, spec)
                    for d, part in enumerate(deq.chunk(self.directions, dim=0)):
                        suffix = "_reverse" if d else ""
                        getattr(rnn, f"weight_{key}_l{k}{suffix}").copy_(to_torch_gates(part, self.kind))

    def _stacked(self, name: str) -> torch.Tensor:
        """A torch weight of every direction, in ONNX gate order, stacked: (D * G * H, K)."""
        parts = [getattr(self.rnn, name + ("_reverse" if d else "")).detach() for d in range(self.directions)]
        return torch.cat([to_onnx_gates(p, self.kind) for p in parts], dim=0)

    def _bias(self, k: int) -> torch.Tensor:
        """ONNX B of layer ``k``: (D, 2 * G * H) = [Wb, Rb] per direction, in ONNX gate order."""
        g = len(GATE_ORDER[self.kind]) * self.rnn.hidden_size
        rows = []
        for d in range(self.directions):
            suffix = "_reverse" if d else ""
            if self.rnn.bias:
                wb = to_onnx_gates(getattr(self.rnn, f"bias_ih_l{k}{suffix}").detach(), self.kind)
                rb = to_onnx_gates(getattr(self.rnn, f"bias_hh_l{k}{suffix}").detach(), self.kind)
            else:
                wb = rb = torch.zeros(g)
            rows.append(torch.cat([wb, rb]))
        return torch.stack(rows)

    def spec_of(self, key: str, k: int) -> QuantSpec:
        return self._w.with_params(getattr(self, f"{key}{k}_scale"), getattr(self, f"{key}{k}_zp").to(torch.int32))

    def specs(self) -> dict[str, QuantSpec]:
        """One spec per quantized tensor: ``weight_ih_l0``, ``weight_hh_l0``, ..."""
        return {f"weight_{key}_l{k}": self.spec_of(key, k) for k in range(self.rnn.num_layers) for key in ("ih", "hh")}

    @property
    def direction(self) -> str:
        return "bidirectional" if self.directions == 2 else "forward"

    def _file_scale(self, key: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point as DynamicQuantizeLSTM reads them: (D,) per tensor, (D, 4H) per row."""
        s, z = getattr(self, f"{key}{k}_scale"), getattr(self, f"{key}{k}_zp")
        if s.dim() == 0:
            return _c(s.reshape(1).expand(self.directions)), _c(z.reshape(1).expand(self.directions))
        return _c(s.reshape(self.directions, -1)), _c(z.reshape(self.directions, -1))

    def _file_weight(self, key: str, k: int) -> torch.Tensor:
        """Codes as the file stores them: [D, K, G * H] (transposed per direction)."""
        q = getattr(self, f"{key}{k}_q")
        return _c(q.reshape(self.directions, -1, q.shape[1]).transpose(1, 2).contiguous())

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(f"{self.kind} with int8 weights runs in ONNX Runtime only; the C and TFLite exports have "
                            f"no recurrent kernel")
        rnn = self.rnn
        if rnn.batch_first:
            x = x.transpose(0, 1)
        hs, cs = [], []
        h0 = c0 = None
        if hx is not None:
            h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        d = self.directions
        for k in range(rnn.num_layers):
            h0k = None if h0 is None else h0[k * d:(k + 1) * d]
            c0k = None if c0 is None else c0[k * d:(k + 1) * d]
            y, h, c = self._layer(x, k, h0k, c0k)
            t_len, _, batch, hidden = y.shape
            x = y.permute(0, 2, 1, 3).reshape(t_len, batch, d * hidden)
            hs.append(h)
            cs.append(c)
        out = x.transpose(0, 1) if rnn.batch_first else x
        h_n = torch.cat(hs)
        if self.kind == "LSTM":
            return out, (h_n, torch.cat(cs))
        return out, h_n

    def extra_repr(self) -> str:
        return f"weight={self._w.describe()}"


class QuantLSTM(QuantRNNBase):
    """LSTM with int8 W and R and uint8 activations quantized at run time (DynamicQuantizeLSTM)."""

    kind = "LSTM"

    def _layer(self, x, k, h0, c0):
        b = _c(self._bias(k))
        ws, wz = self._file_scale("ih", k)
        rs, rz = self._file_scale("hh", k)
        wq, rq = self._file_weight("ih", k), self._file_weight("hh", k)
        if torch.onnx.is_in_onnx_export():
            return _DynamicQuantizeLSTM.apply(x, wq, rq, b, h0, c0, ws, wz, rs, rz, self.rnn.hidden_size,
                                              self.direction)
        return dynamic_lstm(x, wq, rq, b, h0, c0, ws, rs, self.rnn.hidden_size, self.directions)


class QuantGRU(QuantRNNBase):
    """GRU (or, as ``QuantRNN``, an Elman RNN) with int8 weights dequantized in the graph; float compute."""

    kind = "GRU"

    def _layer(self, x, k, h0, c0):
        rnn = self.rnn
        b = _c(self._bias(k))
        args = [getattr(self, f"{key}{k}_{part}") for key in ("ih", "hh") for part in ("q", "scale", "zp")]
        nonlinearity = getattr(rnn, "nonlinearity", "tanh")
        if torch.onnx.is_in_onnx_export():
            y, h = _DequantRNN.apply(x, *args, b, h0, self.kind, rnn.hidden_size, self.direction, nonlinearity)
        else:
            d = self.directions
            w = _dequant(*args[:3]).reshape(d, -1, args[0].shape[1])
            r = _dequant(*args[3:]).reshape(d, -1, args[3].shape[1])
            y, h = float_rnn(self.kind, x, w, r, b, h0, rnn.hidden_size, d, nonlinearity)
        return y, h, None


class QuantRNN(QuantGRU):
    kind = "RNN"


QUANT_RNN = {nn.LSTM: QuantLSTM, nn.GRU: QuantGRU, nn.RNN: QuantRNN}

