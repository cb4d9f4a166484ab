"""Pure-numpy quantization math in AMCT's conventions (SPEC 4.1-4.3): scale/offset, fake quant, ARQ, bias."""
