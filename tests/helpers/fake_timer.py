"""A deterministic device for the latency-budget tests: times from shapes, not from a clock.

A linear or conv layer costs ``1 ps`` per multiply-accumulate, ``(1 + penalty)`` times that
when its output width is not a multiple of ``multiple`` (a kernel cliff, as MKL has at 16 on
some CPUs); any other node 10 ps per output element; a whole model its nodes' costs plus
``overhead`` seconds per call (what a launch or a framework adds). Every round gives the same
number, so plans built with it are exactly reproducible; ``calls`` counts the measurements
asked for (the cache tests check none are repeated).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn


class FakeTimer:
    def __init__(self, multiple: int = 8, penalty: float = 0.3, overhead: float = 0.0,
                 key: str = "fake device") -> None:
        self.multiple, self.penalty, self.overhead = multiple, penalty, overhead
        self.key = key
        self.calls = {"nodes": 0, "models": 0, "layers": 0}

    def _layer(self, module: nn.Module, x_shape: tuple[int, ...], out_shape: tuple[int, ...]
               ) -> float | None:
        if isinstance(module, nn.Linear):
            width = module.out_features
            macs = math.prod(x_shape[:-1]) * module.in_features * width
        elif isinstance(module, nn.modules.conv._ConvNd):
            width = module.out_channels
            macs = (math.prod(out_shape) * module.weight[0].numel())
        else:
            return None
        cliff = 1.0 if self.multiple <= 1 or width % self.multiple == 0 else 1 + self.penalty
        return macs * 1e-12 * cliff

    def nodes(self, graphs: dict[str, fx.GraphModule], args: dict[str, tuple[Any, ...]],
              rounds: int) -> dict[str, dict[str, float]]:
        self.calls["nodes"] += 1
        out: dict[str, dict[str, float]] = {}
        for name, gm in graphs.items():
            times = out.setdefault(name, {})
            for node in gm.graph.nodes:
                if node.op not in ("call_module", "call_function", "call_method"):
                    continue
                meta = node.meta.get("tensor_meta")
                shape = tuple(meta.shape) if hasattr(meta, "shape") else ()
                seconds = None
                if node.op == "call_module":
                    src = node.args[0].meta.get("tensor_meta") if node.args and isinstance(
                        node.args[0], fx.Node) else None
                    x_shape = tuple(src.shape) if hasattr(src, "shape") else shape
                    seconds = self._layer(gm.get_submodule(str(node.target)), x_shape, shape)
                times[node.name] = seconds if seconds is not None else \
                    (math.prod(shape) if shape else 1) * 1e-11
        return out

    def models(self, models: dict[str, nn.Module], inputs: Any,
               rounds: int) -> dict[str, list[float]]:
        """Each model traced (as the table's nodes are) and its nodes' times summed, plus the
        per-call overhead."""
        from surgery.graph.capture import trace

        self.calls["models"] += 1
        graphs, args = {}, {}
        for name, model in models.items():
            capture = trace(model, inputs)
            graphs[name], args[name] = capture.graph_module, capture.example_args
        self.calls["nodes"] -= 1
        per = self.nodes(graphs, args, rounds)
        return {name: [self.overhead + sum(per[name].values())] * rounds for name in models}

    def layers(self, layers: dict[str, tuple[nn.Module, torch.Tensor]],
               rounds: int) -> dict[str, float]:
        self.calls["layers"] += 1
        out = {}
        for name, (layer, x) in layers.items():
            with torch.no_grad():
                y = layer(x)
            out[name] = self._layer(layer, tuple(x.shape), tuple(y.shape)) or 0.0
        return out
