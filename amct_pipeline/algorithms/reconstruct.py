"""Block reconstruction: retrain a quantized model block by block against the float model (no labels).

The quantized program is the float program with engine fake-quant operators inserted (ULQ activation
quantizers with learnable clips, AdaRound / arq_retrain / ulq_retrain weight quantizers). Blocks are
the pieces between the float program's cut points (``Program.blocks``). For each block, in order:

* the float block runs on the float inputs: its output is the target;
* the quantized block runs on the *quantized* model's inputs (the output of the blocks already
  retrained), so each block also learns to undo the error that reaches it (BRECQ);
* with ``qdrop`` > 0 each activation element of a training forward stays float with that probability
  (QDrop, Wei et al. 2022: a flatter objective that transfers better to held-out inputs);
  ``block_input``: a block trains on the quantized model's inputs (default), on the float model's
  (``float``: each block learns its own error only), or on their element-wise QDrop mixture
  (``mixed``: the float input with probability ``qdrop``);
* Adam minimises ``mean((out - target)^2) / mean(target^2)`` (plus AdaRound's rounding regulariser,
  annealed from beta 20 to 2 after a warm-up) over mini-batches drawn with a seeded generator;
* ``average`` > 0 (Polyak averaging): the values checked and kept are an exponential moving average
  of the steps' values, started at the block's start (few samples: the average of a noisy
  trajectory holds out better than its last point);
* after training, AdaRound rounds hard; if hard rounding ends worse than round-to-nearest with the
  learned clips, the block keeps round-to-nearest (a block never ends worse than where it started
  on the training samples).

Memory: the float inputs, the quantized inputs and the targets of one block are held at a time
(``Store``: in memory, or memory-mapped files in a scratch folder when larger than ``spill_bytes``).
Deterministic: the batch order comes from ``numpy.random.default_rng([seed, block])``, the QDrop
masks from ``default_rng([seed, block, 1])``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..autodiff import ULQ, AdaRound, Adam, Executor, FakeQuant, Program, QDrop, ulq_guard

__all__ = ["ReconstructSettings", "ClipParam", "Store", "reconstruct", "BlockReport", "augment_images",
           "resized_crop"]


@dataclass(frozen=True)
class ReconstructSettings:
    steps: int = 300                  # per block
    batch_size: int = 8               # samples per step
    micro_batch: int = 0              # samples per engine run (0: batch_size; 1 for fixed-batch models)
    lr_clip: float = 2e-3             # relative to each clip's initial magnitude
    lr_round: float = 1e-3            # AdaRound alpha
    lr_weight: float = 2e-3           # arq_retrain / ulq_retrain weights, relative to the weight scale
    lr_scale: float = 1e-3            # ulq_retrain scales, relative to their initial value
    lr_bias: float = 1e-3             # biases, relative to the weights' quantization step times sqrt(fan-in)
    reg_weight: float = 0.1           # AdaRound regulariser, relative to the block's initial loss
    qdrop: float = 0.0                # QDrop: probability that a training forward keeps an activation float
    block_input: str = "quantized"    # what a block trains on: "quantized" model's, "float", or "mixed" (QDrop)
    warmup: float = 0.2               # fraction of steps without the regulariser
    check_every: int = 25             # steps between early-stop checks
    patience: int = 4                 # checks without a 1% improvement before stopping
    average: float = 0.0              # decay of the moving average of the values kept (0: the last step's)
    holdout: int = 0                  # samples (of the originals) kept out of training to choose the block's values
    originals: int = 0                # samples before augmented copies (sample i's copies: i + k * originals)
    seed: int = 0
    spill_bytes: int = 512 << 20
    spill_dir: str | None = None


@dataclass
class ClipParam:
    """One activation quantizer's learnable clips (``fixed_min``: clip_min stays 0)."""

    max_name: str
    min_name: str | None
    clip_max: float
    clip_min: float


@dataclass
class BlockReport:
    index: int
    inputs: list[str]
    outputs: list[str]
    layers: int
    steps: int
    seconds: float
    loss_start: float          # relative MSE of the block output before training (quantized inputs)
    loss_end: float            # after training, hard rounding
    rounding: str              # "ada" | "nearest" (fallback) | "-"


class Store:
    """Arrays of N samples per tensor: in memory, or memory-mapped under ``directory`` when large."""

    def __init__(self, spill_bytes: int, directory: str | None) -> None:
        self.spill_bytes, self.directory = spill_bytes, directory
        self.arrays: dict[str, np.ndarray] = {}
        self._count = 0

    def new(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.directory is not None and nbytes > self.spill_bytes:
            self._count += 1
            path = os.path.join(self.directory, f"spill-{self._count}.npy")
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        else:
            array = np.empty(shape, dtype=dtype)
        self.arrays[name] = array
        return array

    def drop(self, keep: Sequence[str]) -> None:
        for name in [n for n in self.arrays if n not in keep]:
            array = self.arrays.pop(name)
            filename = getattr(array, "filename", None)
            del array
            if filename:
                try:
                    os.unlink(filename)
                except OSError:
                    pass


def _rows(arrays: Mapping[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[index]) for k, v in arrays.items()}


def _run_into(exe: Executor, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], store: Store,
              prefix: str, micro: int) -> dict[str, np.ndarray]:
    """Run ``exe`` over all samples (no recording) into new store arrays ``prefix + output``."""
    n = len(next(iter(inputs.values())))
    result: dict[str, np.ndarray] = {}
    for a in range(0, n, micro):
        got = exe.forward(_rows(inputs, slice(a, min(n, a + micro))), outputs=outputs, grad=False)
        for name in outputs:
            if name not in result:
                result[name] = store.new(prefix + name, (n, *got[name].shape[1:]), got[name].dtype)
            result[name][a:a + len(got[name])] = got[name]
    return result


def _loss(out: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray], power: Mapping[str, float]):
    """(mean over outputs of MSE / target power, gradient per output)."""
    value, grads = 0.0, {}
    k = len(out)
    for name, y in out.items():
        diff = y - target[name]
        p = max(power[name], 1e-30)
        value += float(np.mean(np.square(diff, dtype=np.float64))) / p / k
        grads[name] = diff * diff.dtype.type(2.0 / (diff.size * p * k))
    return value, grads


def _power(target: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(np.square(np.asarray(v), dtype=np.float64))) for k, v in target.items()}


def reconstruct(float_program: Program, quant_program: Program, blocks: Sequence[tuple[list[str], list[str]]],
                data: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray], clips: Sequence[ClipParam],
                rounding: Mapping[str, AdaRound], lrs: Mapping[str, float], settings: ReconstructSettings,
                progress: Callable[[int, int, int], Any] | None = None, layer_types=("Conv", "ConvTranspose",
                                                                                     "Gemm", "MatMul")
                ) -> tuple[dict[str, np.ndarray], list[BlockReport]]:
    """Train ``params`` (name -> initial value: clips, AdaRound alphas, weights, scales, biases) block by
    block; returns the learned values and one report per block. ``rounding``: alpha name -> its op.
    ``progress(block, step, steps)`` is called after every step (and with step 0 when a block starts)."""
    store = Store(settings.spill_bytes, settings.spill_dir)
    learned = {k: np.array(v, copy=True) for k, v in params.items()}
    clip_of = {c.max_name: c for c in clips}
    micro = settings.micro_batch or settings.batch_size
    float_in = {k: store.new("f:" + k, v.shape, v.dtype) for k, v in data.items()}
    quant_in = float_in
    for k, v in data.items():
        float_in[k][...] = v
    reports = []
    for index, (inputs, outputs) in enumerate(blocks):
        start = time.perf_counter()
        fexe = Executor(float_program, inputs=inputs, outputs=outputs)
        target = _run_into(fexe, float_in, outputs, store, f"t{index}:", micro)
        del fexe
        sub = quant_program.subprogram(inputs, outputs)
        names = [k for k in learned if k in sub.constants]
        exe = Executor(sub, params={k: learned[k] for k in names})
        ops = {k: rounding[k] for k in names if k in rounding}
        train_in = float_in if settings.block_input == "float" else quant_in
        mix = float_in if settings.block_input == "mixed" and quant_in is not float_in else None
        report = _train_block(index, exe, ops, {k: lrs[k] for k in names}, clip_of, train_in, target, settings,
                              micro, progress, mix)
        for k in names:
            learned[k] = exe.params[k]
        report.layers = sum(1 for n in sub.nodes if n.op_type in layer_types)
        report.inputs, report.outputs = list(inputs), list(outputs)
        quant_out = _run_into(exe, quant_in, outputs, store, f"q{index}:", micro)
        for op in ops.values():
            op.hard = False       # the program keeps soft ops; the caller reads codes from alphas
        report.seconds = time.perf_counter() - start
        reports.append(report)
        float_in, quant_in = target, quant_out
        store.drop([*(f"t{index}:" + o for o in outputs), *(f"q{index}:" + o for o in outputs)])
    store.drop([])
    return learned, reports


def _train_block(index: int, exe: Executor, ops: Mapping[str, AdaRound], lrs: Mapping[str, float],
                 clip_of: Mapping[str, ClipParam], inputs: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
                 settings: ReconstructSettings, micro: int, progress,
                 mix: Mapping[str, np.ndarray] | None = None) -> BlockReport:
    n = len(next(iter(inputs.values())))
    power = _power(target)
    rng = np.random.default_rng([settings.seed, index])
    mix_drop = QDrop(settings.qdrop, np.random.default_rng([settings.seed, index, 2])) if mix is not None else None
    train_rows, held_rows = split_holdout(n, settings.originals or n, settings.holdout)
    batch = min(settings.batch_size, len(train_rows))
    steps = settings.steps if exe.params else 0
    eval_index = train_rows[:max(batch, 32)]

    def evaluate(index=eval_index) -> float:
        total = 0.0
        for a in range(0, len(index), micro):
            rows = index[a:a + micro]
            out = exe.forward(_rows(inputs, rows), outputs=list(target), grad=False)
            total += _loss(out, _rows(target, rows), power)[0] * len(rows)
        return total / len(index)

    def held_out() -> float:
        """The held-out samples' loss with hard rounding (what the block would keep now)."""
        modes = {k: op.hard for k, op in ops.items()}
        for op in ops.values():
            op.hard = True
        value = evaluate(held_rows)
        for k, op in ops.items():
            op.hard = modes[k]
        return value

    for op in ops.values():
        op.hard = True
    initial = {k: v.copy() for k, v in exe.params.items()}
    loss_start = evaluate()           # hard rounding from the initial alphas = round-to-nearest
    chosen = (held_out(), initial) if len(held_rows) else None    # (held-out loss, values) of the best so far
    start_held = chosen[0] if chosen is not None else math.inf
    for op in ops.values():
        op.hard = False
    _set_drop(exe, QDrop(settings.qdrop, np.random.default_rng([settings.seed, index, 1]))
              if settings.qdrop > 0 else None)
    optimizer = Adam(exe.params, lr=dict(lrs))
    ema = {k: v.copy() for k, v in exe.params.items()} if settings.average > 0 else None
    warm = int(settings.warmup * steps)
    reg_scale = settings.reg_weight * max(loss_start, 1e-12)
    alpha_count = sum(exe.params[k].size for k in ops) or 1
    if progress:
        progress(index, 0, steps)
    order = np.empty(0, dtype=np.int64)
    best, since, window, done = math.inf, 0, [], 0
    for step in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(train_rows)])
        rows, order = np.sort(order[:batch]), order[batch:]
        grads: dict[str, np.ndarray] = {}
        value = 0.0
        for a in range(0, len(rows), micro):
            part = rows[a:a + micro]
            feed = _rows(inputs, part)
            if mix is not None:     # QDrop's block input: each element the float model's with probability qdrop
                for k, v in _rows(mix, part).items():
                    np.copyto(feed[k], v, where=mix_drop.mask(v.shape))
            out = exe.forward(feed, outputs=list(target))
            loss, g_out = _loss(out, _rows(target, part), power)
            weight = len(part) / len(rows)
            value += loss * weight
            for name, g in exe.backward({k: v * v.dtype.type(weight) for k, v in g_out.items()}).items():
                grads[name] = g if name not in grads else grads[name] + g
        if ops and step >= warm:
            beta = 20.0 + (2.0 - 20.0) * (step - warm) / max(steps - warm - 1, 1)
            for name, op in ops.items():
                _, reg_grad = op.regularizer(exe.params[name], beta)
                grads[name] = grads[name] + reg_grad * reg_grad.dtype.type(reg_scale / alpha_count)
        previous = {k: (float(exe.params[k].reshape(-1)[0]), float(exe.params[c.min_name].reshape(-1)[0])
                        if c.min_name else 0.0) for k, c in clip_of.items() if k in exe.params}
        optimizer.step(grads)
        _guard_clips(exe.params, clip_of, previous)
        if ema is not None:
            for k, v in exe.params.items():
                ema[k] *= ema[k].dtype.type(settings.average)
                ema[k] += v * v.dtype.type(1 - settings.average)
        done = step + 1
        window.append(value)
        if progress:
            progress(index, done, steps)
        if done % settings.check_every == 0:
            if chosen is not None:      # early stop and choice on samples the block never trained on
                with _swapped(exe.params, ema):
                    window = [held_out()]
                    if window[0] < chosen[0]:
                        chosen = (window[0], {k: v.copy() for k, v in exe.params.items()})
            mean = float(np.mean(window))
            window = []
            if mean < best * 0.99:
                best, since = mean, 0
            else:
                since += 1
            # early stop only once rounding has been annealed for a while (or there is none)
            if since >= settings.patience and (not ops or step >= warm + (steps - warm) // 2):
                break
    _set_drop(exe, None)
    if ema is not None:
        for k, v in ema.items():
            exe.params[k][...] = v
    if chosen is not None and held_out() >= chosen[0]:     # an earlier check (or the start) held out better
        for k, v in chosen[1].items():
            exe.params[k][...] = v
    for op in ops.values():
        op.hard = True
    loss_end, rounding = evaluate(), ("ada" if ops else "-")
    judge = (lambda: evaluate(held_rows)) if len(held_rows) else evaluate
    if ops:     # hard rounding of the learned alphas against round-to-nearest, both with the learned clips
        learned = {k: exe.params[k].copy() for k in ops}
        ada = judge()
        for k in ops:
            exe.params[k][...] = initial[k]
        if judge() < ada:
            loss_end, rounding = evaluate(), "nearest"
        else:
            for k in ops:
                exe.params[k][...] = learned[k]
    # training did not pay (on the held-out samples when there are some)
    keep_start = judge() > start_held if chosen is not None else loss_end > loss_start
    if keep_start:   # training did not pay: the block keeps its start
        for k, v in initial.items():
            exe.params[k][...] = v
        loss_end, rounding = loss_start, "start"
    return BlockReport(index, [], [], 0, done, 0.0, loss_start, loss_end, rounding)


@contextmanager
def _swapped(params: dict[str, np.ndarray], values: Mapping[str, np.ndarray] | None):
    """``params`` hold ``values`` inside the block (none: unchanged), their own values again after it."""
    if values is None:
        yield
        return
    own = {k: params[k].copy() for k in values}
    for k, v in values.items():
        params[k][...] = v
    try:
        yield
    finally:
        for k, v in own.items():
            params[k][...] = v


def split_holdout(n: int, originals: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): the last ``holdout`` original samples are held out, and their
    augmented copies (rows ``i + k * originals``) left out of training too; held-out rows are the
    originals only (what the model will meet)."""
    sample = np.arange(n) % max(originals, 1)
    held = sample >= originals - holdout if holdout > 0 else np.zeros(n, bool)
    return np.flatnonzero(~held), np.flatnonzero(held & (np.arange(n) < originals))


def _set_drop(exe: Executor, drop: QDrop | None) -> None:
    """Give every activation quantizer of the block ``drop`` (None: quantize every element)."""
    for node in exe.nodes:
        if isinstance(node.op, (ULQ, FakeQuant)):
            node.op.drop = drop


def _guard_clips(params: dict[str, np.ndarray], clip_of: Mapping[str, ClipParam], previous) -> None:
    """SPEC 4.9's safeguards after each update (a collapsed or sign-flipped range reverts)."""
    for name, (old_max, old_min) in previous.items():
        clip = clip_of[name]
        new_max = float(params[name].reshape(-1)[0])
        new_min = float(params[clip.min_name].reshape(-1)[0]) if clip.min_name else 0.0
        kept_max, kept_min = ulq_guard(new_max, new_min, (old_max, old_min))
        if not clip.min_name:
            kept_max = new_max if new_max > 1e-6 else old_max
        params[name][...] = kept_max
        if clip.min_name:
            params[clip.min_name][...] = kept_min


# -- training data augmentation ------------------------------------------------------------------
def augment_images(x: np.ndarray, copies: int, flip: bool, crop: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` ([N, C, H, W]) followed by ``copies`` augmented copies of every sample: each mirrored
    left-right with probability 1/2 (``flip``) and, when ``crop`` < 1, a random crop of
    ``[crop, 1]`` of the area (aspect ratio 3/4 .. 4/3) resized back to H x W (bilinear). More
    distinct inputs for the reconstruction of a model trained on such images (ImageNet's own
    augmentations), so learned values fit the few samples less."""
    n, _, height, width = x.shape
    out = np.empty((n * (1 + copies), *x.shape[1:]), dtype=x.dtype)
    out[:n] = x
    for k in range(copies):
        for i in range(n):
            image = x[i]
            if crop < 1.0:
                image = _random_resized_crop(image, crop, rng)
            if flip and rng.random() < 0.5:
                image = image[:, :, ::-1]
            out[n * (k + 1) + i] = image
    return out


def _random_resized_crop(image: np.ndarray, crop: float, rng: np.random.Generator) -> np.ndarray:
    _, height, width = image.shape
    area = rng.uniform(crop, 1.0) * height * width
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    h = min(height, max(1, int(round(math.sqrt(area / ratio)))))
    w = min(width, max(1, int(round(math.sqrt(area * ratio)))))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return resized_crop(image, top, left, h, w)


def resized_crop(image: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """The box ``[top, top + h) x [left, left + w)`` of ``image`` ([C, H, W]) resized to H x W,
    bilinear with half-pixel centres (ONNX Resize ``linear`` / ``half_pixel``)."""
    _, height, width = image.shape
    rows = _linear_taps(top, h, height)
    cols = _linear_taps(left, w, width)
    return _resample(_resample(image, rows, axis=1), cols, axis=2)


def _linear_taps(start: int, size: int, out: int):
    """(lower index, upper index, upper weight) sampling ``size`` pixels from ``start`` at ``out`` points
    (pixel centres, half-pixel rule)."""
    pos = start + (np.arange(out) + 0.5) * (size / out) - 0.5
    pos = np.clip(pos, start, start + size - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, start + size - 1)
    return low, high, (pos - low).astype(np.float32)


def _resample(image: np.ndarray, taps, axis: int) -> np.ndarray:
    low, high, weight = taps
    shape = [1] * image.ndim
    shape[axis] = -1
    weight = weight.reshape(shape).astype(image.dtype)
    return np.take(image, low, axis=axis) * (1 - weight) + np.take(image, high, axis=axis) * weight


def bar(enabled: bool, total_steps: int, blocks: int):
    """A tqdm bar over every step of every block (stderr; off unless the run shows progress)."""
    from tqdm import tqdm
    return tqdm(total=total_steps, desc=f"retrain ({blocks} blocks)", unit="step", disable=not enabled,
                file=sys.stderr, leave=False)

