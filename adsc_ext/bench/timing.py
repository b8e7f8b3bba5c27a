"""Repeated measurements with their spread, and the judgement of a target from them.

A timing is a list of samples (seconds, or a rate) taken after warm-up. Its record keeps every
sample, the median and the relative spread ``(max - min) / median``. A speed-up of ADSC over the
baseline is judged against a target only where the samples allow it: the worst and best ratios the
samples admit (``baseline_min / adsc_max`` and ``baseline_max / adsc_min`` for times) must both lie
on the same side of the target; otherwise the verdict is ``"inconclusive"``, never "met".
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

__all__ = ["Samples", "sync", "wall_samples", "kernel_seconds", "speedup_bounds", "verdict"]


class Samples(list):
    """Measured values of one quantity (floats), with their summary."""

    @property
    def median(self) -> float:
        return statistics.median(self)

    @property
    def spread(self) -> float:
        m = self.median
        return (max(self) - min(self)) / m if m else 0.0

    def summary(self) -> Dict[str, Any]:
        return dict(median=self.median, min=min(self), max=max(self), spread=self.spread, samples=list(self))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_samples(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> Samples:
    """Synchronised wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    out = Samples()
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def kernel_seconds(fn: Callable[[], Any], device: torch.device, iters: int = 20, repeats: int = 5) -> Samples:
    """Seconds per call of a device kernel: ``iters`` back-to-back calls timed together (CUDA events
    on a GPU, behind a queued sleep so the events time the kernels, not the host's launch rate)."""
    fn()
    out = Samples()
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(50_000_000)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) / iters)
    return out


def speedup_bounds(baseline: Sequence[float], adsc: Sequence[float], higher_is_better: bool) -> Dict[str, float]:
    """ADSC's speed-up over the baseline: median ratio and the worst / best ratios the samples admit.
    Times (``higher_is_better=False``): baseline / ADSC; rates: ADSC / baseline."""
    b, a = Samples(baseline), Samples(adsc)
    if higher_is_better:
        return dict(speedup=a.median / b.median, low=min(a) / max(b), high=max(a) / min(b))
    return dict(speedup=b.median / a.median, low=min(b) / max(a), high=max(b) / min(a))


def verdict(value: float, target: float, low: Optional[float] = None, high: Optional[float] = None,
            higher_is_better: bool = True) -> str:
    """``"met"`` / ``"missed"`` for ``value`` against ``target``, or ``"inconclusive"`` when the
    interval ``[low, high]`` of what the samples admit contains the target."""
    lo = value if low is None else low
    hi = value if high is None else high
    if not higher_is_better:
        lo, hi, value, target = -hi, -lo, -value, -target
    if lo >= target:
        return "met"
    if hi < target:
        return "missed"
    return "inconclusive"

