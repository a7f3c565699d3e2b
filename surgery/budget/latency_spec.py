"""Where and how a latency budget is measured: device, threads, batch, backend, target time.

A latency budget only means something on one device at one batch size: the same pruned
MiniLM is 3.2x faster on two CPU threads at batch 32 and less at batch 1, where fixed costs
weigh more. So the budget carries this spec, validated here before anything is traced or
timed (a device that is not present, a backend that is not installed, a batch below 1 are
refused with what to do instead), and the latency table is cached under a key built from it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import BudgetError, OptionsError

BACKENDS = ("torch", "onnxruntime")
RATIOS = (1.0, 0.75, 0.55, 0.4, 0.25)
"""Uniform keep ratios at which the latency table times the whole model, node by node."""


@dataclass(frozen=True)
class LatencySpec:
    """How ``budget="latency"`` measures.

    - ``batch``: batch size the latency is for (default: the example inputs' rows, repeated
      to it when larger).
    - ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (must be present).
    - ``threads``: CPU threads torch (or onnxruntime) use while timing (default: torch's
      current setting); part of the cache key.
    - ``backend``: ``"torch"`` or ``"onnxruntime"`` (CPU; the exported model is checked
      against PyTorch, as ``surgery export`` does).
    - ``target_ms``: a target time per batch instead of ``target_speedup``.
    - ``rounds``: interleaved timing rounds per measurement (medians are used).
    - ``ratios``: the uniform keep ratios the table is measured at (1.0 is always added).
    - ``correct``: measure the pruned model and, when the achieved speedup misses the asked
      one by more than ``tolerance``, re-allocate once from the measurement.
    - ``cache``: keep tables on disk (under ``$SURGERY_CACHE/latency``, default
      ``~/.cache/surgery/latency``); a folder path to use another place; False to re-measure.
    - ``timer``: an object timing models and nodes in place of the device (see
      :class:`surgery.budget.timers.Timer`); tests inject a deterministic one.
    """

    batch: int | None = None
    device: str = "cpu"
    threads: int | None = None
    backend: str = "torch"
    target_ms: float | None = None
    rounds: int = 7
    ratios: tuple[float, ...] = RATIOS
    correct: bool = True
    tolerance: float = 0.05
    cache: Any = True
    timer: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        self.check()

    def check(self) -> None:
        """Refuse what cannot be measured, before any work."""
        def whole(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if self.batch is not None and not (whole(self.batch) and self.batch >= 1):
            raise BudgetError(f"latency batch must be a whole number >= 1, got {self.batch!r}.")
        if self.threads is not None and not (whole(self.threads) and self.threads >= 1):
            raise BudgetError(f"latency threads must be a whole number >= 1, got "
                              f"{self.threads!r}.")
        if not (whole(self.rounds) and self.rounds >= 1):
            raise BudgetError(f"latency rounds must be a whole number >= 1, got {self.rounds!r}.")
        if self.backend not in BACKENDS:
            raise OptionsError(f"latency backend must be one of {BACKENDS}, got "
                               f"{self.backend!r}.")
        if self.target_ms is not None and not (isinstance(self.target_ms, numbers.Real)
                                               and self.target_ms > 0):
            raise BudgetError(f"target_ms must be a positive time in milliseconds, got "
                              f"{self.target_ms!r}.")
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise BudgetError(f"latency ratios must be keep ratios in (0, 1], got "
                              f"{self.ratios!r}.")
        if not 0 < self.tolerance < 1:
            raise BudgetError(f"latency tolerance must be a fraction in (0, 1), got "
                              f"{self.tolerance!r}.")
        if self.timer is None:
            check_device(self.device, self.backend)


def check_device(device: str, backend: str = "torch") -> None:
    """An :class:`OptionsError` when ``device`` is not present here or ``backend`` is not
    installed: a latency budget for a device that cannot be timed would be a guess."""
    import torch

    if not isinstance(device, str) or not device:
        raise OptionsError(f"latency device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        pass
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise OptionsError(f"latency device {device!r} is not present: torch sees no CUDA "
                               "device here; time on device='cpu' or run where the GPU is.")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise OptionsError(f"latency device {device!r} is not present: torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 ...).")
    else:
        raise OptionsError(f"latency device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    if backend == "onnxruntime":
        if kind != "cpu":
            raise OptionsError("the onnxruntime latency backend times on the CPU; use "
                               "device='cpu' with it (or backend='torch' for CUDA).")
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise OptionsError("backend='onnxruntime' needs onnxruntime: pip install "
                               "'model-surgery[report]'.") from exc


def check_speedup(target_speedup: Any, spec: LatencySpec | None) -> None:
    """``budget="latency"`` needs ``target_speedup`` >= 1 or a ``target_ms``, not both."""
    target_ms = spec.target_ms if spec is not None else None
    if target_speedup is None and target_ms is None:
        raise BudgetError("budget='latency' needs target_speedup= (e.g. 2 for twice as fast) "
                          "or latency=LatencySpec(target_ms=...).")
    if target_speedup is not None and target_ms is not None:
        raise BudgetError("give target_speedup or latency.target_ms, not both.")
    if target_speedup is not None and (
            not isinstance(target_speedup, numbers.Real) or isinstance(target_speedup, bool)
            or not target_speedup >= 1.0 or target_speedup == float("inf")):
        raise BudgetError(f"target_speedup must be a finite number >= 1 (how many times faster "
                          f"than the dense model), got {target_speedup!r}; a speedup below 1 "
                          "would ask for a slower model.")


__all__ = ["BACKENDS", "RATIOS", "LatencySpec", "check_device", "check_speedup"]
