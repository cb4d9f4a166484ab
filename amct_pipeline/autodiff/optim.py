"""Optimisation helpers for training programs: Adam and the mean squared error.

Deterministic (no randomness, fixed operation order); parameters are updated in place, so an
``Executor``'s ``params`` dict can be handed over directly.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["Adam", "mse"]


class Adam:
    """Adam (Kingma & Ba) on a dict of arrays, updated in place. ``lr`` may be one rate or a rate per
    parameter name (e.g. clips and rounding variables learn at different speeds); a name's rate may be
    an array broadcast against its parameter (a rate per channel)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float | Mapping[str, float | np.ndarray] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def rate(self, name: str) -> float | np.ndarray:
        rate = self.lr[name] if isinstance(self.lr, Mapping) else self.lr
        return np.asarray(rate, np.float32) if np.ndim(rate) else float(rate)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1 - self.beta1 ** self.t
        c2 = 1 - self.beta2 ** self.t
        for name, g in grads.items():
            if name not in self.params:
                continue
            p, m, v = self.params[name], self.m[name], self.v[name]
            g = np.asarray(g, dtype=p.dtype)
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            step = (m / c1) / (np.sqrt(v / c2) + self.eps)
            p -= np.asarray(self.rate(name), p.dtype) * step.astype(p.dtype, copy=False)


def mse(output: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """``mean((output - target)^2)`` and its gradient with respect to ``output``."""
    diff = output - target
    return float(np.mean(np.square(diff, dtype=np.float64))), diff * diff.dtype.type(2.0 / diff.size)
