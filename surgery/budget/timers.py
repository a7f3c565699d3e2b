"""Timers: the device a latency budget is measured on, behind one small interface.

The latency table needs three measurements (every fx node of a model, whole models side by
side, and standalone layers at many widths) and the final check needs the second again. A
:class:`Timer` provides them for one device and backend: :class:`TorchTimer` (CPU at a
given thread count, or a CUDA device, synchronised around every timed call) and
:class:`OnnxRuntimeTimer` (models exported to ONNX, checked against PyTorch, and timed in an
onnxruntime session). Everything measured is a median over rounds in which the candidates
take turns (:mod:`surgery.timing`), so a busy machine slows them alike. Tests inject their own
deterministic timer through ``LatencySpec(timer=...)``.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.fx as fx

from surgery._core.batches import as_args, to_device
from surgery._core.modes import evaluating
from surgery.budget.latency_spec import LatencySpec
from surgery.timing import time_interleaved


class Timer(Protocol):
    """What the latency table and the final check measure with (seconds throughout)."""

    key: str
    """The device, backend, threads and library versions: part of the table's cache key."""

    def nodes(self, graphs: dict[str, fx.GraphModule], args: dict[str, tuple[Any, ...]],
              rounds: int) -> dict[str, dict[str, float]]:
        """Median seconds of every node of each graph module (``graphs[name]`` run on
        ``args[name]``), the graphs taking turns round by round."""
        ...

    def models(self, models: dict[str, torch.nn.Module], inputs: Any,
               rounds: int) -> dict[str, list[float]]:
        """Seconds per forward pass of each model on ``inputs``, one per round, interleaved."""
        ...

    def layers(self, layers: dict[str, tuple[torch.nn.Module, torch.Tensor]],
               rounds: int) -> dict[str, float]:
        """Median seconds of each standalone layer on its input, interleaved."""
        ...


class _NodeClock(fx.Interpreter):
    """Runs a graph module, adding each node's wall time to ``seconds`` (synchronised on
    CUDA, so the time is the node's, not the queue's)."""

    def __init__(self, gm: fx.GraphModule, cuda: bool) -> None:
        super().__init__(gm)
        self.cuda = cuda
        self.seconds: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[n.name] = time.perf_counter() - start
        return result


class TorchTimer:
    """Times on a torch device: ``"cpu"`` (at ``threads`` intra-op threads while timing) or
    ``"cuda[:N]"``. Models, graphs and inputs are moved to the device by the caller."""

    def __init__(self, device: str = "cpu", threads: int | None = None) -> None:
        self.device = torch.device(device)
        self.threads = threads or torch.get_num_threads()
        self.cuda = self.device.type == "cuda"
        name = (torch.cuda.get_device_name(self.device) if self.cuda
                else platform.processor() or platform.machine())
        self.key = (f"torch {torch.__version__} {device} ({name}) threads={self.threads}")

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def nodes(self, graphs: dict[str, fx.GraphModule], args: dict[str, tuple[Any, ...]],
              rounds: int) -> dict[str, dict[str, float]]:
        names = list(graphs)
        samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        with self._threads(), torch.inference_mode():
            for name in names:  # warm-up: first calls allocate and pick kernels
                _NodeClock(graphs[name], self.cuda).run(*args[name])
            for r in range(rounds):
                for name in names if r % 2 == 0 else reversed(names):
                    clock = _NodeClock(graphs[name], self.cuda)
                    clock.run(*args[name])
                    for node, s in clock.seconds.items():
                        samples[name].setdefault(node, []).append(s)
        return {name: {node: statistics.median(s) for node, s in per.items()}
                for name, per in samples.items()}

    def models(self, models: dict[str, torch.nn.Module], inputs: Any,
               rounds: int) -> dict[str, list[float]]:
        with self._threads():
            return time_interleaved(models, inputs, rounds=rounds)

    def layers(self, layers: dict[str, tuple[torch.nn.Module, torch.Tensor]],
               rounds: int) -> dict[str, float]:
        names = list(layers)
        samples: dict[str, list[float]] = {n: [] for n in names}
        with self._threads(), torch.inference_mode():
            for name in names:
                layer, x = layers[name]
                layer(x)
            for r in range(rounds):
                for name in names if r % 2 == 0 else reversed(names):
                    layer, x = layers[name]
                    if self.cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    layer(x)
                    if self.cuda:
                        torch.cuda.synchronize()
                    samples[name].append(time.perf_counter() - start)
        return {n: statistics.median(s) for n, s in samples.items()}


class OnnxRuntimeTimer:
    """Times models exported to ONNX in onnxruntime's CPU provider at ``threads`` intra-op
    threads. Each model is exported with :func:`surgery.io.onnx.export_onnx` (so the file is
    checked against PyTorch on the timing inputs) once per timer. Per-node times, which an
    exported graph no longer maps to fx nodes, come from PyTorch on the same CPU: they give the
    table its shape, and the end-to-end onnxruntime times its scale."""

    def __init__(self, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.threads = threads or torch.get_num_threads()
        self.torch = TorchTimer("cpu", self.threads)
        self.key = f"onnxruntime {ort.__version__} cpu, " + self.torch.key
        self._dir = tempfile.TemporaryDirectory(prefix="surgery-ort-")
        self._sessions: dict[int, tuple[torch.nn.Module, Any]] = {}

    def nodes(self, graphs: dict[str, fx.GraphModule], args: dict[str, tuple[Any, ...]],
              rounds: int) -> dict[str, dict[str, float]]:
        return self.torch.nodes(graphs, args, rounds)

    def _session(self, model: torch.nn.Module, inputs: Any) -> Any:
        import onnxruntime as ort

        from surgery.io.onnx import export_onnx

        held = self._sessions.get(id(model))
        if held is not None and held[0] is model:
            return held[1]
        path = Path(self._dir.name) / f"model{len(self._sessions)}.onnx"
        with evaluating(model):  # export_onnx leaves the model in eval mode
            export_onnx(model, inputs, path, check_inputs=inputs, dynamic_batch=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._sessions[id(model)] = (model, session)
        return session

    def _feed(self, session: Any, inputs: Any) -> dict[str, Any]:
        args, kwargs = as_args(to_device(inputs, "cpu"))
        tensors = [*args, *kwargs.values()]
        by_name = {**{f"input_{i}": t for i, t in enumerate(args)}, **kwargs}
        return {gi.name: by_name.get(gi.name, tensors[min(i, len(tensors) - 1)]).numpy()
                for i, gi in enumerate(session.get_inputs())}

    def models(self, models: dict[str, torch.nn.Module], inputs: Any,
               rounds: int) -> dict[str, list[float]]:
        runs = {}
        for name, model in models.items():
            session = self._session(model, inputs)
            runs[name] = (session, self._feed(session, inputs))
        return _interleave(runs, rounds)

    def layers(self, layers: dict[str, tuple[torch.nn.Module, torch.Tensor]],
               rounds: int) -> dict[str, float]:
        import onnxruntime as ort

        runs = {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        for i, (name, (layer, x)) in enumerate(layers.items()):
            path = Path(self._dir.name) / f"layer{i}.onnx"
            with contextlib.redirect_stdout(None), _quiet():
                torch.onnx.export(layer.cpu().eval(), (x.cpu(),), str(path), dynamo=False,
                                  input_names=["x"], opset_version=17)
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
            runs[name] = (session, {"x": x.cpu().numpy()})
        return {n: statistics.median(s) for n, s in _interleave(runs, rounds).items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _interleave(runs: dict[str, tuple[Any, dict[str, Any]]], rounds: int) -> dict[str, list[float]]:
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        session, feed = runs[name]
        session.run(None, feed)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            session, feed = runs[name]
            start = time.perf_counter()
            session.run(None, feed)
            samples[name].append(time.perf_counter() - start)
    return samples


def timer_for(spec: LatencySpec) -> Timer:
    """The spec's injected timer, or one for its device and backend."""
    if spec.timer is not None:
        return spec.timer
    if spec.backend == "onnxruntime":
        return OnnxRuntimeTimer(spec.threads)
    return TorchTimer(spec.device, spec.threads)


__all__ = ["OnnxRuntimeTimer", "Timer", "TorchTimer", "timer_for"]
