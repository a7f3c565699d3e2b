"""Counting parameters and MACs, and timing a forward pass.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (flops / 2), the counter torch
maintains for its own ops, rather than per-layer formulas of our own.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from surgery._core.batches import call
from surgery._core.modes import restore_modes, training_modes


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


class _Totals:
    """Stands in for FlopCounterMode's module tracker: only totals are needed here, and the
    tracker's autograd hooks fail on some models (a parameter expanded to its own shape under
    ``no_grad`` and passed to a submodule, as timm's PiT and CaiT do with batch 1)."""

    parents = {"Global"}

    def __enter__(self) -> "_Totals":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _Totals()
    return counter


def count_macs(model: torch.nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs``."""
    counter = _counter()
    with torch.no_grad(), counter:
        call(model, example_inputs)
    return counter.get_total_flops() // 2


class _NodeMacs(fx.Interpreter):
    """Runs a GraphModule recording the MACs of every node separately."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        counter = _counter()
        with counter:
            result = super().run_node(n)
        flops = counter.get_total_flops()
        if flops:
            self.macs[n.name] = flops // 2
        return result


def node_macs(gm: fx.GraphModule, args: tuple[Any, ...]) -> dict[str, int]:
    """MACs per fx node for one forward pass on ``args`` (the budget's cost model)."""
    interp = _NodeMacs(gm)
    with torch.no_grad():
        interp.run(*args)
    return interp.macs


def measure_latency(
    model: torch.nn.Module, example_inputs: Any, *, repeats: int = 10, warmup: int = 2
) -> float:
    """Median wall time (seconds) of a forward pass in inference mode."""
    modes = training_modes(model)
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call(model, example_inputs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        restore_modes(modes)
    return statistics.median(times)
