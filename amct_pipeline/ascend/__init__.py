"""The Ascend backend, in one package.

* :mod:`.target` -- the ``ascend`` lowering target (AMCT's deploy model for ATC) and its lowering report;
* :mod:`.schemas` -- the Ascend operators' ONNX schemas, and ``onnx.checker`` for deploy models without
  registering them with onnx (opt-in registration: :func:`ascend_schemas_registered`);
* :mod:`.packing` -- UINT64 dequant-scale packing;
* :mod:`.ops` -- numpy reference kernels of the Ascend quantization operators;
* :mod:`.reference` -- a CPU executor of deploy models (``onnx.reference``);
* :mod:`.verify` -- deploy model against fake-quant model (``amct-pipeline verify-deploy``).

Importing the package does not import the target (which needs the lowering machinery):
``from amct_pipeline.ascend.target import AscendTarget``.
"""
from __future__ import annotations

from .errors import AscendError
from .kernels import avgpool_int, conv_int, conv_transpose_int, gemm_int, matmul_int
from .ops import ascend_anti_quant, ascend_dequant, ascend_quant, ascend_requant, ascend_weight_quant
from .packing import pack_deq_scale, unpack_deq_scale
from .reference import DeployEvaluator, check_deploy_model, make_deploy_evaluator, run_deploy_model
from .schemas import ascend_schemas_registered, register_ascend_schemas

__all__ = [
    "AscendError",
    "DeployEvaluator",
    "ascend_anti_quant",
    "ascend_dequant",
    "ascend_quant",
    "ascend_requant",
    "ascend_schemas_registered",
    "ascend_weight_quant",
    "avgpool_int",
    "check_deploy_model",
    "conv_int",
    "conv_transpose_int",
    "gemm_int",
    "make_deploy_evaluator",
    "matmul_int",
    "pack_deq_scale",
    "register_ascend_schemas",
    "run_deploy_model",
    "unpack_deq_scale",
]
