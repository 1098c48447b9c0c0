"""Independent, deliberately naive re-implementations used as test oracles (numpy, per class)."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


class NumpyIAS:
    """The IAS of method §2, per class with np.quantile, float64."""

    def __init__(self, c: int, alpha: float, beta: float, gamma: float, fp16: bool = False):
        self.th = np.full(c, 0.9)
        self.v = np.zeros(c)
        self.seen = np.zeros(c, bool)
        self.a, self.b, self.g, self.fp16 = alpha, beta, gamma, fp16
        self.c = c

    def step(self, conf: np.ndarray, pred: np.ndarray) -> np.ndarray:
        sample = conf.astype(np.float16).astype(np.float64) if self.fp16 else conf
        new = self.th.copy()
        for c in range(self.c):
            s = np.concatenate([[self.th[c]], sample[pred == c]])
            new[c] = np.quantile(s, 1 - self.a * self.th[c] ** self.g)
        self.th = self.b * self.th + (1 - self.b) * new
        self.th[self.th >= 1] = 0.999
        lab = np.where(conf >= self.th[pred], pred, 255)
        for c in range(self.c):
            m = lab == c
            if m.any():
                mean = conf[m].mean()
                self.v[c] = 0.99 * self.v[c] + 0.01 * mean if self.seen[c] else mean
                self.seen[c] = True
        return lab
