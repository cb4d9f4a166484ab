"""Ascend INT8 deploy target: UINT64 dequant-scale packing, numpy reference kernels of the Ascend
quantization operators, and a CPU executor of deploy models (``onnx.reference``)."""
from __future__ import annotations

from .errors import AscendError
from .ops import (
    ascend_anti_quant,
    ascend_dequant,
    ascend_quant,
    ascend_requant,
    ascend_weight_quant,
    avgpool_int,
    conv_int,
    conv_transpose_int,
    gemm_int,
    matmul_int,
)
from .packing import pack_deq_scale, unpack_deq_scale
from .reference import DeployEvaluator, check_deploy_model, make_deploy_evaluator, run_deploy_model

__all__ = [
    "AscendError",
    "DeployEvaluator",
    "ascend_anti_quant",
    "ascend_dequant",
    "ascend_quant",
    "ascend_requant",
    "ascend_weight_quant",
    "avgpool_int",
    "check_deploy_model",
    "conv_int",
    "conv_transpose_int",
    "gemm_int",
    "make_deploy_evaluator",
    "matmul_int",
    "pack_deq_scale",
    "run_deploy_model",
    "unpack_deq_scale",
]
