"""Timing forward passes honestly on a shared machine.

A latency ratio taken from two models timed one after the other is at the mercy of whatever
else the machine did meanwhile: on a busy 2-core box "dense, then pruned" once reported a
pruned model 0.24x as fast where a quiet rerun measured 1.68x faster. So models are timed
*interleaved*: every round times each model once, in alternating order, and the speedup is
the median over rounds of the per-round ratio (both models saw the same load in a round);
its spread (the quartiles of those ratios) says how far to trust it, and a wide spread is
flagged rather than reported as a figure.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from surgery._core.batches import call
from surgery._core.modes import evaluating

NOISY = 0.15
"""A speedup whose quartiles differ by more than this share of it is flagged as noisy."""


@dataclass(frozen=True)
class Timing:
    """One model's forward time over the rounds: median and quartiles, in milliseconds."""

    median_ms: float
    low_ms: float
    high_ms: float
    rounds: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        low, median, high = _quartiles(seconds)
        return cls(median * 1e3, low * 1e3, high * 1e3, len(seconds))


@dataclass(frozen=True)
class Speedup:
    """How many times faster the second model is than the first: the median over rounds of
    the per-round time ratio, with the quartiles of those ratios."""

    ratio: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, dense: list[float], pruned: list[float]) -> "Speedup":
        low, median, high = _quartiles([d / p for d, p in zip(dense, pruned)])
        return cls(median, low, high, len(dense))

    @property
    def spread(self) -> float:
        """Width of the middle half of the per-round ratios, relative to the median."""
        return (self.high - self.low) / self.ratio

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY

    def text(self) -> str:
        """``"2.14x faster"``, ``"4.10x slower"`` (never "0.24x faster"), with the spread when
        it is too wide to trust."""
        words = (f"{self.ratio:.2f}x faster" if self.ratio >= 1
                 else f"{1 / self.ratio:.2f}x slower")
        if self.noisy:
            words += (f" (noisy: middle half of {self.rounds} rounds "
                      f"{self.low:.2f}-{self.high:.2f}x; the machine was busy, rerun "
                      "`surgery bench`)")
        return words


def time_interleaved(models: dict[str, torch.nn.Module], inputs: Any, *, rounds: int = 9,
                     warmup: int = 2, run: Callable[[torch.nn.Module, Any], Any] = call
                     ) -> dict[str, list[float]]:
    """Seconds per forward pass (or per ``run(model, inputs)``: a generation, say) of each
    model on ``inputs``, one per round, the models taking turns (in alternating order) within
    every round; after ``warmup`` untimed passes each."""
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for model in models.values():
            with evaluating(model):
                for _ in range(warmup):
                    run(model, inputs)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                samples[name].append(_time_once(models[name], inputs, run))
    return samples


def measure_latency(model: torch.nn.Module, example_inputs: Any, *, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time (seconds) of a forward pass in inference mode."""
    return statistics.median(time_interleaved({"model": model}, example_inputs,
                                              rounds=repeats, warmup=warmup)["model"])


def _time_once(model: torch.nn.Module, inputs: Any,
               run: Callable[[torch.nn.Module, Any], Any]) -> float:
    with evaluating(model):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(model, inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high
