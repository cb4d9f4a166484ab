"""AMCT-style evaluator for the benchmarks: top-1 (percent) of MobileNetV2 on ImageNet dev images 100-249.

    amct-pipeline run auto_calibrate_int8 --model mobilenetv2_fp32.onnx --data calib=calib.npy -o out \
        --set passes.auto_calibrate.options.evaluator=imagenet_evaluator:Top1Evaluator   # PYTHONPATH=benchmarks

``metric_eval`` accepts a model at most ``AMCT_BENCH_TOP1_DROP`` points (default 0.5) below the float
model. ``AMCT_BENCH_EVAL_SLEEP`` adds seconds per evaluation (the kill test uses it to land mid-way).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from amct_pipeline.algorithms.autocal import AutoCalibrationEvaluatorBase

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet(start: int = 0, stop: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed NCHW float32 images and labels (as benchmarks/ptq.py prepares them)."""
    data = np.load(SHARED / "data" / "imagenet_dev250_224_uint8.npz")
    images, labels = data["images_nhwc_uint8"][start:stop], data["labels"][start:stop]
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1)) / np.asarray(STD, np.float32).reshape(1, 3, 1, 1)
    return x, labels


class Top1Evaluator(AutoCalibrationEvaluatorBase):
    def __init__(self) -> None:
        self.x, self.labels = imagenet(100, 250)
        self.drop = float(os.environ.get("AMCT_BENCH_TOP1_DROP", "0.5"))
        self.sleep = float(os.environ.get("AMCT_BENCH_EVAL_SLEEP", "0"))

    def evaluate(self, model_file: str) -> float:
        from amct_pipeline.runtime.ort import make_session
        session = make_session(model_file)
        name = session.get_inputs()[0].name
        logits = np.concatenate([session.run(None, {name: self.x[i:i + 25]})[0] for i in range(0, len(self.x), 25)])
        time.sleep(self.sleep)
        return float(100.0 * np.mean(logits.argmax(1) == self.labels))

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = original_metric - new_metric
        return loss <= self.drop + 1e-9, loss
