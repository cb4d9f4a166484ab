"""Written the way AMCT's ONNX QAT-model conversion sample is; only the import line differs.

    python qat_convert.py QDQ_MODEL OUTDIR
"""
import os
import sys

import amct_pipeline.amct_onnx as amct          # was: import amct_onnx as amct


def main():
    model_file, path = sys.argv[1], sys.argv[2]
    save_path = os.path.join(path, 'results', 'qat')
    record_file = os.path.join(path, 'results', 'record.txt')
    amct.convert_qat_model(model_file, save_path, record_file)


if __name__ == '__main__':
    main()
