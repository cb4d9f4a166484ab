"""``amct_onnx.common`` as AMCT's samples import it."""
