"""Written the way AMCT's ONNX MobileNetV2 accuracy-based auto calibration sample is; only the import
lines differ.

    python mobilenet_auto_calibration.py MODEL DATA.npy LABELS.npy OUTDIR
"""
import os
import sys

import numpy as np
import onnxruntime as ort

import amct_pipeline.amct_onnx as amct                                          # was: import amct_onnx as amct
from amct_pipeline.amct_onnx.common.auto_calibration import AutoCalibrationEvaluatorBase   # was: amct_onnx.common...


def onnx_forward(onnx_model, images, batch_size, iterations):
    ort_session = ort.InferenceSession(onnx_model, amct.AMCT_SO)
    input_name = ort_session.get_inputs()[0].name
    outputs = [ort_session.run(None, {input_name: images[i * batch_size:(i + 1) * batch_size]})[0]
               for i in range(iterations)]
    return np.concatenate(outputs)


class ModelEvaluator(AutoCalibrationEvaluatorBase):
    def __init__(self, images, labels, batch_size, batch_num, diff=0.02):
        self.images, self.labels = images, labels
        self.batch_size, self.batch_num, self.diff = batch_size, batch_num, diff

    def calibration(self, model_file):
        onnx_forward(model_file, self.images, self.batch_size, self.batch_num)

    def evaluate(self, model_file):
        iterations = len(self.images) // self.batch_size
        logits = onnx_forward(model_file, self.images, self.batch_size, iterations)
        return float(np.mean(logits.argmax(-1) == self.labels[:len(logits)]))

    def metric_eval(self, original_metric, new_metric):
        loss = original_metric - new_metric
        return loss <= self.diff, loss


def main():
    model_file, data_file, labels_file, path = sys.argv[1:5]
    images, labels = np.load(data_file), np.load(labels_file)
    tmp = os.path.join(path, 'tmp')
    os.makedirs(tmp, exist_ok=True)
    config_json_file = os.path.join(tmp, 'config.json')
    amct.create_quant_config(config_file=config_json_file, model_file=model_file, skip_layers=None, batch_num=1,
                             activation_offset=True)
    record_file = os.path.join(tmp, 'scale_offset_record.txt')
    evaluator = ModelEvaluator(images, labels, batch_size=8, batch_num=1)
    amct.accuracy_based_auto_calibration(model_file=model_file, model_evaluator=evaluator,
                                         config_file=config_json_file, record_file=record_file,
                                         save_dir=os.path.join(path, 'results', 'mobilenetv2'),
                                         strategy='BinarySearch', sensitivity='CosineSimilarity')


if __name__ == '__main__':
    main()
