"""Written the way AMCT's ONNX ResNet sample is; only the import line differs.

    python resnet_calibration.py MODEL DATA.npy OUTDIR [BATCH_NUM] [BATCH_SIZE]
"""
import os
import sys

import numpy as np
import onnxruntime as ort

import amct_pipeline.amct_onnx as amct          # was: import amct_onnx as amct


def onnx_forward(onnx_model, images, batch_size=16, iterations=1):
    ort_session = ort.InferenceSession(onnx_model, amct.AMCT_SO)
    input_name = ort_session.get_inputs()[0].name
    outputs = []
    for i in range(iterations):
        input_batch = images[i * batch_size:(i + 1) * batch_size]
        outputs.append(ort_session.run(None, {input_name: input_batch})[0])
    return np.concatenate(outputs)


def main():
    model_file, data_file, path = sys.argv[1], sys.argv[2], sys.argv[3]
    batch_num = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    batch_size = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    images = np.load(data_file)
    tmp = os.path.join(path, 'tmp')
    os.makedirs(tmp, exist_ok=True)

    config_json_file = os.path.join(tmp, 'config.json')
    skip_layers = []
    amct.create_quant_config(config_file=config_json_file, model_file=model_file, skip_layers=skip_layers,
                             batch_num=batch_num, activation_offset=True, config_defination=None)

    scale_offset_record_file = os.path.join(tmp, 'scale_offset_record.txt')
    modified_model = os.path.join(tmp, 'modified_model.onnx')
    amct.quantize_model(config_file=config_json_file, model_file=model_file, modified_onnx_file=modified_model,
                        record_file=scale_offset_record_file)

    # calibration: run the modified model batch_num times
    onnx_forward(modified_model, images, batch_size, batch_num)

    amct.save_model(modified_onnx_file=modified_model, record_file=scale_offset_record_file,
                    save_path=os.path.join(path, 'results', 'resnet'))

    # run the fake-quant model, as the sample does
    quant_model_path = os.path.join(path, 'results', 'resnet_fake_quant_model.onnx')
    float_out = onnx_forward(model_file, images, batch_size, batch_num)
    quant_out = onnx_forward(quant_model_path, images, batch_size, batch_num)
    agreement = float(np.mean(float_out.argmax(-1) == quant_out.argmax(-1)))
    print(f"top-1 agreement fake-quant vs float: {agreement:.3f}")


if __name__ == '__main__':
    main()
