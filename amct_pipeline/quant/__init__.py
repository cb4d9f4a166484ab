"""The quantization domain every pass, algorithm and target shares (imports only ``ir``, ``amct``,
``options`` and ``errors``).

``params`` quantization parameters; ``math`` AMCT's scale/offset, fake-quant, ARQ and bias math;
``layers`` quantizable layers and the layer map; ``weights`` weights as layers apply them;
``plan`` the lowering plan; ``facts`` graph-level quantization facts (block outputs, factor
propagation, Relu/Clip bounds); ``fakequant`` the one fake-quant emitter; ``qdq_analysis`` reading
QuantizeLinear/DequantizeLinear models.
"""
