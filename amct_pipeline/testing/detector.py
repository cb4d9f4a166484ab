"""A ShuffleNetV2-style detector built in code, for the QDQ data-movement tests and the PTQ benchmark.

Layer shapes are ShuffleNetV2 1.0x's (Ma et al. 2018, torchvision ``shufflenet_v2_x1_0``: stem
conv 3x3/2 + MaxPool, stages of 4 / 8 / 4 units with 116 / 232 / 464 channels; a unit splits its
input in two channel halves, runs one half through 1x1 -> depthwise 3x3 -> 1x1 convs, concatenates
and shuffles the channels with Reshape -> Transpose -> Reshape), a YOLO-style PAN neck (nearest
Resize x2 and Concat top-down, depthwise stride-2 convs and Concat bottom-up, 96 channels), and a
YOLOv5 head on strides 8 / 16 / 32 (3 anchors each: 1x1 conv -> Reshape -> Transpose -> Sigmoid ->
Split into xy / wh / confidences -> box decoding in pixels -> Concat). With the default 16 units and
4 neck Concats there are 20 Concats before the head's.

The single output ``detections`` [N, boxes, 5 + classes] holds, per box, x, y, w, h in pixels (0 to
several hundred), the objectness and the class probabilities (0 to 1): the values of very different
ranges that meet in one tensor.

Weights are random (fixed seed) but well-conditioned: each conv's weights have variance
``1 / fan_in`` and the BatchNormalization statistics match the second moment the conv output has
(tracked analytically from the input), so activations stay of order one through every layer; head
biases follow YOLOv5's initialisation (objectness ~ 8 objects per 640 x 640 image, classes ~ 0.6 / C),
so probabilities are small and skewed as in a trained detector. ``bn=False`` folds nothing in:
convs carry biases and no BatchNormalization.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["shufflenet_detector", "DETECTOR_INPUT", "DETECTOR_OUTPUT", "detector_parts", "YOLO_ANCHORS"]

DETECTOR_INPUT = "images"
DETECTOR_OUTPUT = "detections"
# YOLOv5's anchors (w, h in pixels) for strides 8, 16, 32
YOLO_ANCHORS = (((10, 13), (16, 30), (33, 23)), ((30, 61), (62, 45), (59, 119)), ((116, 90), (156, 198), (373, 326)))


def detector_parts(classes: int) -> dict[str, slice]:
    """Slices of the last axis of ``detections``: pixel boxes, objectness, class probabilities."""
    return {"boxes": slice(0, 4), "objectness": slice(4, 5), "classes": slice(5, 5 + classes)}


class _Builder:
    def __init__(self, seed: int, bn: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.bn = bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.moment: dict[str, float] = {}     # tensor -> approximate mean square of its values
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, name: str, values, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(values, dtype)), name))
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, outputs: int = 1, **attrs) -> list[str]:
        name = self.name(base)
        outs = [f"{name}:{i}" if outputs > 1 else f"{name}:0" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs

    def conv(self, x: str, cin: int, cout: int, *, k: int = 1, stride: int = 1, group: int = 1, relu: bool = True,
             tag: str = "conv") -> str:
        fan_in = cin // group * k * k
        moment = self.moment[x]
        # variance-preserving weights: E[y^2] ~ E[x^2]; without BatchNormalization they also undo E[x^2]
        w = self.rng.normal(0.0, 1.0 / math.sqrt(fan_in * (1.0 if self.bn else moment)), (cout, cin // group, k, k))
        inputs = [x, self.const(self.name(f"{tag}.weight"), w)]
        if not self.bn:
            inputs.append(self.const(self.name(f"{tag}.bias"), self.rng.normal(0.0, 0.1, cout)))
        (y,) = self.node("Conv", inputs, tag, kernel_shape=[k, k], strides=[stride, stride], group=group,
                         pads=[k // 2] * 4)
        if self.bn:
            stats = (self.rng.uniform(0.6, 1.4, cout), self.rng.normal(0.1, 0.2, cout),
                     self.rng.normal(0.0, 0.1, cout) * np.sqrt(moment), moment * self.rng.uniform(0.8, 1.25, cout))
            names = [self.const(self.name(f"{tag}.bn.{key}"), v) for key, v in zip(("scale", "bias", "mean", "var"),
                                                                                    stats)]
            (y,) = self.node("BatchNormalization", [y, *names], f"{tag}.bn", epsilon=1e-5)
        moment = 1.0
        if relu:
            (y,) = self.node("Relu", [y], f"{tag}.relu")
            moment *= 0.5
        self.moment[y] = moment
        return y

    def same(self, out: str, src: str | Sequence[str]) -> str:
        sources = [src] if isinstance(src, str) else list(src)
        self.moment[out] = float(np.mean([self.moment[s] for s in sources]))
        return out

    def shuffle(self, x: str, channels: int, size: int) -> str:
        (a,) = self.node("Reshape", [x, self.const(self.name("shuffle.shape1"), [0, 2, channels // 2, size, size],
                                                   np.int64)], "shuffle.reshape")
        (b,) = self.node("Transpose", [a], "shuffle.transpose", perm=[0, 2, 1, 3, 4])
        (c,) = self.node("Reshape", [b, self.const(self.name("shuffle.shape2"), [0, channels, size, size], np.int64)],
                         "shuffle.reshape")
        return self.same(c, x)

    def unit(self, x: str, cin: int, cout: int, stride: int, size: int) -> str:
        half = cout // 2
        if stride == 1:
            split = self.const(self.name("split.sizes"), [half, half], np.int64)
            x1, x2 = self.node("Split", [x, split], "split", outputs=2, axis=1)
            self.same(x1, x), self.same(x2, x)
            branch_in, branch_c = x2, half
            left = x1
        else:
            left = self.conv(x, cin, cin, k=3, stride=2, group=cin, relu=False, tag="branch1.dw")
            left = self.conv(left, cin, half, tag="branch1.pw")
            branch_in, branch_c = x, cin
        y = self.conv(branch_in, branch_c, half, tag="branch2.pw1")
        y = self.conv(y, half, half, k=3, stride=stride, group=half, relu=False, tag="branch2.dw")
        y = self.conv(y, half, half, tag="branch2.pw2")
        (cat,) = self.node("Concat", [left, y], "unit.concat", axis=1)
        self.same(cat, [left, y])
        return self.shuffle(cat, cout, size)

    def upsample(self, x: str) -> str:
        scales = self.const(self.name("resize.scales"), [1, 1, 2, 2])
        (y,) = self.node("Resize", [x, "", scales], "resize", mode="nearest")
        return self.same(y, x)

    def concat(self, inputs: Sequence[str]) -> str:
        (y,) = self.node("Concat", list(inputs), "neck.concat", axis=1)
        return self.same(y, inputs)


def shufflenet_detector(*, size: int = 320, channels: Sequence[int] = (24, 116, 232, 464),
                        repeats: Sequence[int] = (4, 8, 4), neck: int = 96, classes: int = 20,
                        anchors=YOLO_ANCHORS, batch: int | str = "N", bn: bool = True, seed: int = 0) -> onnx.ModelProto:
    """The detector (see the module docstring); input ``images`` [batch, 3, size, size] (RGB / 255).

    ``channels``: stem, then the three stages; ``repeats``: units per stage. A small variant for
    tests: ``shufflenet_detector(size=64, channels=(8, 16, 32, 64), repeats=(1, 2, 1), neck=16, classes=3)``.
    """
    if size % 32:
        raise ValueError(f"size must be a multiple of 32, got {size}")
    b = _Builder(seed, bn)
    b.moment[DETECTOR_INPUT] = 0.25             # RGB / 255
    x = b.conv(DETECTOR_INPUT, 3, channels[0], k=3, stride=2, tag="stem")
    (pooled,) = b.node("MaxPool", [x], "stem.maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = b.same(pooled, x)
    spatial, cin, features = size // 4, channels[0], []
    for stage, (cout, count) in enumerate(zip(channels[1:], repeats)):
        spatial //= 2
        for index in range(count):
            x = b.unit(x, cin if index == 0 else cout, cout, 2 if index == 0 else 1, spatial)
        cin = cout
        features.append((x, cout, spatial))
    (c3, ch3, s3), (c4, ch4, s4), (c5, ch5, _) = features
    p5 = b.conv(c5, ch5, neck, tag="neck.lateral5")
    p4 = b.conv(b.concat([b.upsample(p5), c4]), neck + ch4, neck, tag="neck.top_down4")
    p3 = b.conv(b.concat([b.upsample(p4), c3]), neck + ch3, neck, tag="neck.top_down3")
    d3 = b.conv(b.conv(p3, neck, neck, k=3, stride=2, group=neck, relu=False, tag="neck.down3.dw"), neck, neck,
                tag="neck.down3.pw")
    n4 = b.conv(b.concat([d3, p4]), 2 * neck, neck, tag="neck.bottom_up4")
    d4 = b.conv(b.conv(n4, neck, neck, k=3, stride=2, group=neck, relu=False, tag="neck.down4.dw"), neck, neck,
                tag="neck.bottom_up4.pw")
    n5 = b.conv(b.concat([d4, p5]), 2 * neck, neck, tag="neck.bottom_up5")
    levels = [_head(b, feature, neck, classes, stride, spatial_size, level_anchors)
              for feature, stride, spatial_size, level_anchors in zip((p3, n4, n5), (8, 16, 32),
                                                                      (s3, s4, s4 // 2), anchors)]
    (out,) = b.node("Concat", levels, "detect.concat", axis=1)
    b.nodes[-1].output[0] = DETECTOR_OUTPUT
    graph = helper.make_graph(
        b.nodes, "shufflenet_detector",
        [helper.make_tensor_value_info(DETECTOR_INPUT, TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info(DETECTOR_OUTPUT, TensorProto.FLOAT, [batch, None, 5 + classes])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="amct-pipeline-testing")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _head(b: _Builder, x: str, channels: int, classes: int, stride: int, size: int, anchors) -> str:
    """YOLOv5 Detect for one level: [N, A*(5+C), H, W] -> decoded [N, A*H*W, 5+C]."""
    count, per = len(anchors), 5 + classes
    w = b.rng.normal(0.0, 0.5 / math.sqrt(channels), (count * per, channels, 1, 1))
    bias = np.zeros((count, per))
    bias[:, 4] = math.log(8 / (640 / stride) ** 2)          # YOLOv5's prior: ~8 objects per 640 x 640 image
    bias[:, 5:] = math.log(0.6 / (classes - 0.99)) if classes > 1 else 0.0
    (y,) = b.node("Conv", [x, b.const(b.name("detect.weight"), w), b.const(b.name("detect.bias"), bias.reshape(-1))],
                  "detect.conv", kernel_shape=[1, 1])
    (y,) = b.node("Reshape", [y, b.const(b.name("detect.shape"), [0, count, per, size, size], np.int64)],
                  "detect.reshape")
    (y,) = b.node("Transpose", [y], "detect.transpose", perm=[0, 1, 3, 4, 2])
    (y,) = b.node("Sigmoid", [y], "detect.sigmoid")
    xy, wh, conf = b.node("Split", [y, b.const(b.name("detect.split"), [2, 2, 1 + classes], np.int64)],
                          "detect.split", outputs=3, axis=4)
    gy, gx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    grid = (np.stack([gx, gy], -1)[None, None] - 0.5) * stride           # [1, 1, H, W, 2], YOLOv5's grid - 0.5
    anchor_grid = np.asarray(anchors, np.float32).reshape(1, count, 1, 1, 2)
    (xy,) = b.node("Mul", [xy, b.const(b.name("detect.two"), np.float32(2 * stride))], "detect.xy_scale")
    (xy,) = b.node("Add", [xy, b.const(b.name("detect.grid"), grid)], "detect.xy")
    (wh,) = b.node("Mul", [wh, b.const(b.name("detect.two"), np.float32(2))], "detect.wh_scale")
    (wh,) = b.node("Mul", [wh, wh], "detect.wh_square")
    (wh,) = b.node("Mul", [wh, b.const(b.name("detect.anchors"), anchor_grid)], "detect.wh")
    (y,) = b.node("Concat", [xy, wh, conf], "detect.cat", axis=4)
    (y,) = b.node("Reshape", [y, b.const(b.name("detect.flat"), [0, -1, per], np.int64)], "detect.flatten")
    return y
