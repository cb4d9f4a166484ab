"""Executor: runs a Program forward and back.

::

    exe = Executor(graph, params=["conv1.weight"])          # trainable initializers (copied)
    out = exe.forward({"input": x})                         # {output name: array}
    grads = exe.backward({"output": dloss_dout})            # {param name: gradient}
    exe.params["conv1.weight"] -= lr * grads["conv1.weight"]

* ``params``: names of constants to train (values copied from the graph, or a mapping name -> initial
  value, which may name a constant added with ``Program.add_constant``). ``grad_inputs``: program
  inputs whose gradient ``backward`` returns too.
* ``inputs`` / ``outputs``: run only the sub-graph between these tensor sets (one block).
* Nodes whose inputs are all constant (and not parameters) are folded once here: shape arithmetic on
  constants, weight view chains, Constant nodes.
* Memory: a tensor is dropped when its last reader has run (unless asked for with ``keep``); a node
  saves what its backward needs only when a gradient will flow through it. ``forward(grad=False)``
  saves nothing.
* ``dtype=np.float64`` runs everything (constants, parameters, float feeds) in that precision.

Deterministic: fixed node order, fixed reduction order, no randomness.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..ir.graph import Graph
from ._util import AutodiffError
from .program import Node, Program

__all__ = ["Executor"]


@dataclass
class _Step:
    node: Node
    record: bool
    need: tuple[bool, ...]
    frees: tuple[str, ...]


@dataclass
class _Plan:
    steps: list[_Step]
    feeds: list[str]


class Executor:
    def __init__(self, source: Program | Graph | onnx.ModelProto | str | Path,
                 params: Iterable[str] | Mapping[str, Any] = (), *, inputs: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None, grad_inputs: Iterable[str] = (),
                 dtype: Any = None, fold: bool = True) -> None:
        program = source if isinstance(source, Program) else Program.from_graph(source)
        if inputs is not None or outputs is not None:
            program = program.subprogram(program.inputs if inputs is None else inputs,
                                         program.outputs if outputs is None else outputs)
        self.program = program
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.params: dict[str, np.ndarray] = {}
        items = params.items() if isinstance(params, Mapping) else ((name, None) for name in params)
        for name, value in items:
            if value is None:
                if name not in program.constants:
                    raise AutodiffError(f"parameter '{name}' is not a constant of the graph")
                value = program.constants[name]
            self.params[name] = self._cast(np.array(value, copy=True))
        self.grad_inputs = list(grad_inputs)
        for name in self.grad_inputs:
            if name not in program.inputs:
                raise AutodiffError(f"grad_inputs: '{name}' is not an input of the program {program.inputs}")
        constants = {k: self._cast(v) for k, v in program.constants.items() if k not in self.params}
        self.constants, self.nodes = self._fold(constants, program.nodes) if fold else (constants, list(program.nodes))
        self._requires = self._requires_grad()
        self._plans: dict[tuple, _Plan] = {}
        self._tape: list[tuple[_Step, Any]] | None = None
        self._outputs: tuple[str, ...] = ()
        self._feed_shapes: dict[str, tuple] = {}

    # -- setup -----------------------------------------------------------------------------------
    def _cast(self, value: np.ndarray) -> np.ndarray:
        if self.dtype is not None and value.dtype.kind == "f" and value.dtype != self.dtype:
            return value.astype(self.dtype)
        return value

    def _fold(self, constants: dict[str, np.ndarray], nodes: Sequence[Node]):
        known = dict(constants)
        kept = []
        for node in nodes:
            names = [t for t in node.inputs if t]
            if all(t in known for t in names):
                ys, _ = node.op.forward([known[t] if t else None for t in node.inputs], None)
                for name, y in zip(node.outputs, ys):
                    known[name] = y
            else:
                kept.append(node)
        return known, kept

    def _requires_grad(self) -> set[str]:
        requires = set(self.params) | set(self.grad_inputs)
        for node in self.nodes:
            op = node.op
            if not op.differentiable:
                continue
            if any(t in requires for j, t in enumerate(node.inputs) if t and j not in op.nondiff_inputs):
                requires.update(t for j, t in enumerate(node.outputs) if t and j not in op.nondiff_outputs)
        return requires

    def requires_grad(self, tensor: str) -> bool:
        """Whether a gradient can reach ``tensor`` from a parameter or a grad input."""
        return tensor in self._requires

    def _plan(self, outputs: tuple[str, ...], keep: frozenset[str]) -> _Plan:
        key = (outputs, keep)
        if key in self._plans:
            return self._plans[key]
        producers = {t: n for n in self.nodes for t in n.outputs}
        wanted = set(outputs) | set(keep)
        needed: set[str] = set()
        stack = [t for t in wanted if t in producers]
        while stack:
            node = producers[stack.pop()]
            if node.name in needed:
                continue
            needed.add(node.name)
            stack.extend(t for t in node.inputs if t in producers)
        nodes = [n for n in self.nodes if n.name in needed]
        available = set(self.constants) | set(self.params) | set(producers)
        feeds = sorted({t for n in nodes for t in n.inputs if t and t not in available}
                       | {t for t in wanted if t not in available})
        # which nodes record for backward: a gradient can reach one of their outputs from the outputs
        flow = {t for t in outputs if t in self._requires}
        records: dict[str, tuple[bool, tuple[bool, ...]]] = {}
        for node in reversed(nodes):
            op = node.op
            hit = op.differentiable and any(t in flow for j, t in enumerate(node.outputs) if j not in op.nondiff_outputs)
            need = tuple(bool(hit and t and t in self._requires and j not in op.nondiff_inputs)
                         for j, t in enumerate(node.inputs))
            hit = hit and any(need)
            records[node.name] = (hit, need)
            if hit:
                flow.update(t for t, n in zip(node.inputs, need) if n)
        last_reader: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for t in node.inputs:
                if t:
                    last_reader[t] = i
        steps = []
        for i, node in enumerate(nodes):
            frees = [t for t in dict.fromkeys(node.inputs) if t and last_reader.get(t) == i]
            frees += [t for t in node.outputs if t not in last_reader]
            frees = tuple(t for t in frees if t not in wanted and t in producers)
            hit, need = records[node.name]
            steps.append(_Step(node, hit, need, frees))
        plan = _Plan(steps, feeds)
        self._plans[key] = plan
        return plan

    # -- running ---------------------------------------------------------------------------------
    def forward(self, feeds: Mapping[str, np.ndarray], *, outputs: Sequence[str] | None = None,
                keep: Iterable[str] = (), grad: bool = True) -> dict[str, np.ndarray]:
        """Run the nodes needed for ``outputs`` (default: the program's) and ``keep``; returns both.

        With ``grad`` (default) the nodes a gradient will pass through save what :meth:`backward` needs."""
        outputs = tuple(self.program.outputs if outputs is None else outputs)
        keep = frozenset(keep)
        plan = self._plan(outputs, keep)
        env: dict[str, np.ndarray] = {}
        missing = [t for t in plan.feeds if t not in feeds]
        if missing:
            raise AutodiffError(f"missing feed(s) {missing}; the program reads {self.program.inputs}")
        for name in plan.feeds:
            env[name] = self._cast(np.asarray(feeds[name]))
        self._feed_shapes = {k: v.shape for k, v in env.items()}
        params, constants = self.params, self.constants
        tape: list[tuple[_Step, Any]] = []
        for step in plan.steps:
            node = step.node
            xs = []
            for t in node.inputs:
                if not t:
                    xs.append(None)
                elif t in env:
                    xs.append(env[t])
                elif t in params:
                    xs.append(params[t])
                else:
                    xs.append(constants[t])
            need = step.need if (grad and step.record) else None
            try:
                ys, saved = node.op.forward(xs, need)
            except AutodiffError:
                raise
            except Exception as exc:
                shapes = [None if x is None else tuple(np.shape(x)) for x in xs]
                raise AutodiffError(f"node '{node.name}' ({node.op_type}) failed on input shapes {shapes}: "
                                    f"{exc}") from exc
            for name, y in zip(node.outputs, ys):
                if name:
                    env[name] = y
            if need is not None:
                tape.append((step, saved))
            for name in step.frees:
                env.pop(name, None)
        self._tape = tape if grad else None
        self._outputs = outputs
        result = {}
        for name in list(outputs) + sorted(keep):
            result[name] = env[name] if name in env else params[name] if name in params else self.constants[name]
        return result

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Forward without recording; the outputs as a list (like onnxruntime's ``run``)."""
        outputs = tuple(self.program.outputs if outputs is None else outputs)
        result = self.forward(feeds, outputs=outputs, grad=False)
        return [result[name] for name in outputs]

    def backward(self, output_grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Gradients of ``sum(output_grads[o] * o)`` for every parameter and grad input (zeros where
        no gradient reaches). Consumes what the last ``forward`` saved."""
        if self._tape is None:
            raise AutodiffError("backward needs a forward with grad=True first (each forward allows one backward)")
        grads: dict[str, np.ndarray] = {}
        for name, g in output_grads.items():
            if name not in self._outputs:
                raise AutodiffError(f"'{name}' is not an output of the last forward {list(self._outputs)}")
            if name in self._requires and g is not None:
                grads[name] = self._cast(np.asarray(g))
        tape, self._tape = self._tape, None
        while tape:
            step, saved = tape.pop()
            node = step.node
            op = node.op
            gys = [None if j in op.nondiff_outputs else grads.pop(t, None) for j, t in enumerate(node.outputs)]
            if all(g is None for g in gys):
                continue
            gxs = op.backward(saved, gys, step.need)
            del saved, gys
            for t, g, n in zip(node.inputs, gxs, step.need):
                if n and g is not None:
                    grads[t] = g if t not in grads else grads[t] + g
        result = {}
        for name, value in self.params.items():
            g = grads.get(name)
            result[name] = np.zeros_like(value) if g is None else g
        for name in self.grad_inputs:
            g = grads.get(name)
            if g is None:
                g = np.zeros(self._feed_shapes.get(name, ()), dtype=self.dtype or np.float32)
            result[name] = g
        return result

    # -- diagnostics -----------------------------------------------------------------------------
    def saved_nbytes(self) -> int:
        """Bytes the last forward keeps for the backward (arrays counted once)."""
        seen: set[int] = set()
        return sum(_nbytes(saved, seen) for _, saved in (self._tape or []))


def _nbytes(obj, seen: set[int]) -> int:
    if isinstance(obj, np.ndarray):
        base = obj if obj.base is None else obj.base
        if not isinstance(base, np.ndarray) or id(base) in seen:
            return 0
        seen.add(id(base))
        return int(base.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, seen) for o in obj.values())
    return 0
