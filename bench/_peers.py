"""The peer tools as every benchmark runs them: onnxruntime.quantization (static, dynamic, int4),
torch.ao's dynamic quantization and torch.nn.utils.prune's global L1."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from edgecompress.finetune import finetune
from edgecompress.layers import weighted_layers
from edgecompress.spec import FineTune


def calibration(task, batches: int | None = None):
    """onnxruntime's CalibrationDataReader over the first ``batches`` of ``task``'s calibration data (all: None)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x.numpy()} for i, (x, _) in enumerate(task.calib_data)
                            if batches is None or i < batches])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def ort_static(src: Path, dst: Path, task, batches: int) -> None:
    """onnxruntime's quantize_static after its pre-processing: QDQ, per channel, ``batches`` calibration batches."""
    from onnxruntime.quantization import QuantFormat, quant_pre_process, quantize_static

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), calibration(task, batches), quant_format=QuantFormat.QDQ, per_channel=True)


def ort_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst))


def ort_int4(src: Path, dst: Path) -> None:
    """onnxruntime's MatMulNBits quantizer: int4, symmetric, blocks of 32."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def torch_dynamic(model: nn.Module) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic of a copy of ``model``: Linear, LSTM and GRU in int8."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU},
                                                  dtype=torch.qint8)


def torch_global_l1(task, sparsity: float, ft: FineTune, seed: int) -> nn.Module:
    """torch.nn.utils.prune's global L1 over every Linear and Conv weight, its masks held by its forward
    hooks during the fine-tune, then made permanent."""
    model = task.fresh_model()
    params = [(m, "weight") for m in weighted_layers(model).values()]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    finetune(model, task.train_data, ft, loss=task.loss, seed=seed)
    for m, name in params:
        tprune.remove(m, name)
    return model.eval()
