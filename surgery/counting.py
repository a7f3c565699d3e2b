"""Measuring a model: parameters, MACs and accuracy (perplexity: :mod:`surgery.language`);
latency through :mod:`surgery.timing`.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (flops / 2), the counter torch
maintains for its own ops, rather than per-layer formulas of our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from surgery._core.batches import call, first_tensor, split_batch, to_device
from surgery._core.modes import evaluating
from surgery.errors import SurgeryError
from surgery.language import Perplexity, generation_speed, is_causal_lm, perplexity
from surgery.timing import Speedup, Timing, time_interleaved


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


@dataclass
class Measurement:
    """What was measured of one model (None: not measured)."""

    params: int
    macs: int
    accuracy: float | None = None
    samples: int | None = None
    latency_ms: float | None = None
    """Median forward time at ``latency_batch``, timed interleaved with the model compared."""
    latency_batch: int | None = None
    latency_quartiles_ms: tuple[float, float] | None = None
    perplexity: Perplexity | None = None
    """A causal language model's perplexity on the evaluation text (instead of accuracy)."""
    tokens_per_s: float | None = None
    """A causal language model's generation speed (KV cache, greedy), timed interleaved."""
    new_tokens: int | None = None


def accuracy(model: torch.nn.Module, batches: Iterable[Any],
             progress: Callable[[int], None] | None = None) -> tuple[float | None, int]:
    """Top-1 accuracy over labelled batches (None when the batches carry no labels or the model
    does not output class scores), and the number of samples seen."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = seen = 0
    with evaluating(model), torch.inference_mode():
        for i, batch in enumerate(batches):
            inputs, labels = split_batch(batch)
            if labels is None:
                return None, 0
            try:
                out = first_tensor(call(model, to_device(inputs, device)))
            except Exception as exc:
                raise SurgeryError(
                    f"evaluation batch {i} does not run through the model: "
                    f"{type(exc).__name__}: {exc}. Batches must look like the model's inputs "
                    "(same type, dtype and dims; batch size may differ)."
                ) from exc
            if out is None or out.ndim != 2:
                return None, 0
            correct += (out.argmax(-1).cpu() == labels.cpu()).sum().item()
            seen += len(labels)
            if progress is not None:
                progress(i)
    return (correct / seen if seen else None), seen


def measure(model: torch.nn.Module, example: Any, *, batches: Iterable[Any] | None = None,
            progress: Callable[[int], None] | None = None) -> Measurement:
    """Params, MACs (on the one-sample ``example``) and, on ``batches`` when given, accuracy
    (perplexity for a causal language model); latency is measured for several models at once
    (:func:`add_latency`)."""
    m = Measurement(count_params(model), count_macs(model, example))
    if batches is not None and is_causal_lm(model):
        m.perplexity = perplexity(model, batches, progress)
        m.samples = m.perplexity.windows
    elif batches is not None:
        m.accuracy, m.samples = accuracy(model, batches, progress)
    return m


def add_latency(measured: dict[str, Measurement], models: dict[str, torch.nn.Module],
                inputs: Any, batch: int | None, *, rounds: int = 9) -> Speedup | None:
    """Time ``models`` interleaved on ``inputs`` (see :mod:`surgery.timing`) and write each
    one's median and quartiles into ``measured[name]``. Returns the speedup of ``"pruned"``
    over ``"dense"`` when both are there."""
    samples = time_interleaved(models, inputs, rounds=rounds)
    for name, seconds in samples.items():
        timing = Timing.of(seconds)
        m = measured[name]
        m.latency_ms, m.latency_batch = timing.median_ms, batch
        m.latency_quartiles_ms = (timing.low_ms, timing.high_ms)
    if {"dense", "pruned"} <= set(samples):
        return Speedup.of(samples["dense"], samples["pruned"])
    return None


def add_generation(measured: dict[str, Measurement], models: dict[str, torch.nn.Module],
                   prompt: torch.Tensor, new_tokens: int, *, rounds: int = 3) -> None:
    """Time causal LMs generating ``new_tokens`` after ``prompt``, interleaved
    (:func:`surgery.language.generation_speed`), into ``measured[name].tokens_per_s``."""
    speed = generation_speed(models, prompt, new_tokens=new_tokens, rounds=rounds)
    for name, rate in speed.tokens_per_s.items():
        measured[name].tokens_per_s, measured[name].new_tokens = rate, new_tokens
