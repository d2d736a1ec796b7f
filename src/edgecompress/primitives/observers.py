"""Observers: statistics of an activation over calibration batches (per tensor), turned into a
calibrated ``QuantSpec``: min-max, moving average, percentile, least squared error, entropy (KL)."""
from __future__ import annotations

import torch

from .quant import QuantSpec, fake_quant, minmax, qparams


class Observer:
    """Collects statistics over calibration batches and returns a calibrated spec."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def result(self) -> QuantSpec:
        if self.spec.is_float:
            return self.spec
        if self.lo is None:
            raise ValueError("observer saw no data")
        return self.spec.with_params(*qparams(*self.range(), self.spec))


class MinMaxObserver(Observer):
    """Running minimum and maximum."""


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum`` weights the new batch)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.1) -> None:
        super().__init__(spec)
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class _Sampled(Observer):
    """Keeps up to ``max_samples`` values (evenly strided, deterministic) for a global search."""

    def __init__(self, spec: QuantSpec, max_samples: int = 1 << 20) -> None:
        super().__init__(spec)
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().float().reshape(-1)
        step = max(1, flat.numel() // (self.max_samples // 8))
        self.samples.append(flat[::step])

    def values(self) -> torch.Tensor:
        v = torch.cat(self.samples)
        step = max(1, v.numel() // self.max_samples)
        return v[::step]


class PercentileObserver(_Sampled):
    """Clips the range to the ``percentile`` of the values (and 100 - percentile below)."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kw) -> None:
        super().__init__(spec, **kw)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values().double()
        p = self.percentile / 100.0
        return torch.quantile(v, 1 - p).float(), torch.quantile(v, p).float()


def _candidates(lo: torch.Tensor, hi: torch.Tensor, steps: int):
    for i in range(steps, 0, -1):
        a = i / steps
        yield lo * a, hi * a


class MSEObserver(_Sampled):
    """The clipping range (a shrink of min-max) whose fake quant has the least mean squared error."""

    def __init__(self, spec: QuantSpec, steps: int = 100, **kw) -> None:
        super().__init__(spec, **kw)
        self.steps = steps

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values()
        best, best_err = (self.lo, self.hi), float("inf")
        for lo, hi in _candidates(self.lo, self.hi, self.steps):
            if float(hi - lo) <= 0:
                break
            s = self.spec.with_params(*qparams(lo, hi, self.spec))
            err = float(((fake_quant(v, s) - v) ** 2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


class EntropyObserver(_Sampled):
    """The clipping threshold minimizing KL(P || Q) between the histogram of |x| and its quantized
    version (TensorRT's entropy calibration), with 2048 bins."""

    def __init__(self, spec: QuantSpec, bins: int = 2048, **kw) -> None:
        super().__init__(spec, **kw)
        self.bins = bins

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        v = self.values()
        nonneg = float(self.lo) >= 0
        a = v.abs().numpy().astype(np.float64)
        amax = float(a.max()) if a.size else 0.0
        if amax == 0:
            return self.lo, self.hi
        hist, edges = np.histogram(a, bins=self.bins, range=(0, amax))
        levels = (self.spec.qmax - self.spec.qmin + 1) if nonneg else (self.spec.qmax + 1)
        best_i, best_kl = self.bins, float("inf")
        for i in range(max(levels, 16), self.bins + 1, 16):
            p = hist[:i].astype(np.float64).copy()
            p[i - 1] += hist[i:].sum()
            # merge into `levels` bins, then spread each back uniformly over its non-empty bins
            idx = (np.arange(i) * levels // i)
            sums = np.bincount(idx, weights=hist[:i], minlength=levels)
            nz = np.bincount(idx, weights=(hist[:i] > 0).astype(np.float64), minlength=levels)
            q = np.where(hist[:i] > 0, sums[idx] / np.maximum(nz[idx], 1), 0.0)
            ps, qs = p.sum(), q.sum()
            if ps == 0 or qs == 0:
                continue
            p, q = p / ps, q / qs
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best_i, best_kl = i, kl
        t = torch.tensor(float(edges[best_i]), dtype=torch.float32)
        lo = torch.clamp(self.lo, min=-t) if not nonneg else self.lo
        return lo, torch.clamp(self.hi, max=t)


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageObserver, "percentile": PercentileObserver,
             "mse": MSEObserver, "entropy": EntropyObserver}


def observer(name: str, spec: QuantSpec, **kw) -> Observer:
    return OBSERVERS[name](spec, **kw)
