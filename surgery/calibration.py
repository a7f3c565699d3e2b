"""Calibration: stream real batches through the model and fold them into moment sums.

Scoring a group needs, for each layer that reads it, the joint second moments of the group's
channels (as that layer sees them) and of the channels that layer writes. Those are sums, so
each batch is folded in and dropped: activations are never all held. Probes are identity
modules inserted after the observed fx nodes; a forward hook on each pools the tensor to a
few positions per example (``grid``) and keeps only the features the relations need.

Sample alignment: two probes are compared example by example and, when both have the same
pooled spatial or token layout, position by position; otherwise features are averaged over
positions first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from surgery.errors import CalibrationError
from surgery.groups import OUTPUT, Coupling, Probe
from surgery.inputs import as_args, first_tensor, to_device

MAX_FEATURES = 4096
"""Above this many channel positions in one probe, positions are averaged per atom."""


@dataclass
class Features:
    """Which channel positions of a probe are read, the atom of each, and whether the columns
    are those positions or (when there are too many) their per-atom averages."""

    positions: np.ndarray
    position_atoms: np.ndarray
    average_atoms: bool

    @property
    def atom_of_column(self) -> np.ndarray:
        return np.unique(self.position_atoms) if self.average_atoms else self.position_atoms


def _features(probe: Probe) -> Features:
    positions = np.nonzero(probe.atom_of_position >= 0)[0]
    atoms = probe.atom_of_position[positions]
    return Features(positions, atoms, len(positions) > MAX_FEATURES)


@dataclass
class MomentSums:
    """Running sums over samples of z = [x, t]: count, sum and outer product (float64)."""

    dx: int
    dt: int
    n: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, z: torch.Tensor) -> None:
        z = z.to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
            self.outer = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
        self.n += z.shape[0]
        self.total += z.sum(0)
        self.outer += z.T @ z

    def covariance(self) -> torch.Tensor:
        mean = self.total / self.n
        return self.outer / self.n - torch.outer(mean, mean)

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def tensors(self) -> dict[str, torch.Tensor]:
        """The raw sums, for reducing across processes (all-reduce of sums is exact)."""
        return {"total": self.total, "outer": self.outer}


@dataclass
class Calibration:
    """Moment sums per relation (index into ``coupling.relations``) and the features layout."""

    coupling: Coupling
    sums: dict[int, MomentSums] = field(default_factory=dict)
    x_features: dict[int, Features] = field(default_factory=dict)
    t_features: dict[int, Features] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0


class _Probe(torch.nn.Module):
    """Identity; its forward hook does the pooling and stores the result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _pool(x: torch.Tensor, axis: int, grid: int) -> torch.Tensor:
    """Move the channel axis last and pool the rest to at most ``grid`` x ``grid`` positions.

    Returns (batch, *positions, channels) in float32."""
    x = x.detach().float().movedim(axis, -1)
    rest = x.shape[1:-1]
    if len(rest) == 2 and (rest[0] > grid or rest[1] > grid):
        x = F.adaptive_avg_pool2d(x.movedim(-1, 1), (min(grid, rest[0]), min(grid, rest[1])))
        x = x.movedim(1, -1)
    elif len(rest) > 2:
        x = x.mean(dim=tuple(range(1, x.ndim - 1)))
    return x


def _columns(pooled: torch.Tensor, feats: Features) -> torch.Tensor:
    cols = pooled.index_select(-1, torch.as_tensor(feats.positions, device=pooled.device))
    if not feats.average_atoms:
        return cols
    column = np.searchsorted(feats.atom_of_column, feats.position_atoms)
    index = torch.as_tensor(column, device=pooled.device)
    out = torch.zeros(*cols.shape[:-1], len(feats.atom_of_column), device=cols.device)
    out.index_add_(-1, index, cols)
    return out / torch.bincount(index).clamp_min(1)


def _align(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of samples for both sides: per position when layouts agree, else per example."""
    if x.shape[:-1] == t.shape[:-1]:
        return x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
    if x.ndim > 2:
        x = x.mean(dim=tuple(range(1, x.ndim - 1)))
    if t.ndim > 2:
        t = t.mean(dim=tuple(range(1, t.ndim - 1)))
    return x, t


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A calibration batch is ``inputs``, ``(inputs, labels)``, or a dict with ``labels``."""
    if isinstance(batch, dict):
        batch = dict(batch)
        labels = batch.pop("labels", None)
        return batch, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and batch[1].dtype in (torch.int64, torch.int32, torch.long) and batch[1].ndim == 1:
        return batch[0], batch[1]
    return batch, None


def top_signal(output: Any, labels: torch.Tensor | None, target: str) -> torch.Tensor:
    """The signal at the top: one-hot labels, or the dense model's own output."""
    out = first_tensor(output)
    if out is None:
        raise CalibrationError("the model returned no tensor; cannot use its output as target.")
    out = out.detach().float()
    if target == "labels":
        if labels is None:
            raise CalibrationError(
                "target='labels' needs labels: give calibration batches as (inputs, labels) or "
                "dicts with a 'labels' key, or use target='output' (no labels needed)."
            )
        k = out.shape[-1] if out.ndim >= 2 else int(labels.max()) + 1
        if labels.dtype.is_floating_point:
            return labels.float().reshape(labels.shape[0], -1)
        if int(labels.max()) >= k or int(labels.min()) < 0:
            raise CalibrationError(f"labels must be class indices in [0, {k}); got "
                                   f"[{int(labels.min())}, {int(labels.max())}].")
        return F.one_hot(labels.long(), k).float()
    if out.ndim > 2:
        return out.reshape(out.shape[0], -1, out.shape[-1])
    return out.reshape(out.shape[0], -1)


def calibrate(
    coupling: Coupling,
    calib_data: Iterable[Any],
    *,
    target: str = "output",
    grid: int = 4,
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
    distributed: bool | None = None,
) -> Calibration:
    """Fold ``calib_data`` into moment sums for every relation of ``coupling``.

    Under ``torch.distributed`` (``distributed=None`` detects an initialised group), rank r
    folds in batches r, r + world, ... and the sums are all-reduced at the end, so every
    rank returns the statistics of the whole data set."""
    from surgery import distributed as dist_calib

    distributed = dist_calib.active() if distributed is None else distributed
    rank, world = (dist_calib.rank(), dist_calib.world_size()) if distributed else (0, 1)
    gm = coupling.capture.graph_module
    relations = coupling.relations
    result = Calibration(coupling)
    needed: dict[str, int] = {}
    for i, rel in enumerate(relations):
        needed[rel.probe.node] = rel.probe.axis
        result.x_features[i] = _features(rel.probe)
        if rel.target != OUTPUT:
            tprobe = coupling.probes[rel.target]
            needed[tprobe.node] = tprobe.axis
            result.t_features[i] = _features(tprobe)

    instrumented, store = _instrument(gm, needed, grid)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    was_training = gm.training
    instrumented.eval()
    try:
        with torch.no_grad():
            for b, batch in enumerate(calib_data):
                if max_batches is not None and b >= max_batches:
                    break
                if b % world != rank:
                    continue
                inputs, labels = split_batch(batch)
                inputs = to_device(inputs, device)
                store.clear()
                args, kwargs = as_args(inputs)
                try:
                    output = instrumented(*args, **kwargs)
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration batch {b} does not run through the model: "
                        f"{type(exc).__name__}: {exc}. Batches must look like example_inputs "
                        "(same type, dtype and dims; batch size may differ)."
                    ) from exc
                top = None
                for i, rel in enumerate(relations):
                    x = _columns(store[rel.probe.node], result.x_features[i])
                    if rel.target == OUTPUT:
                        if top is None:
                            top = top_signal(output, None if labels is None else labels.to(device), target)
                        t = top
                    else:
                        t = _columns(store[coupling.probes[rel.target].node], result.t_features[i])
                    x, t = _align(x, t)
                    z = torch.cat([x, t.to(x.device)], dim=1)
                    if not torch.isfinite(z).all():
                        raise CalibrationError(
                            f"non-finite activations (NaN/inf) at {rel.probe.node} or its target "
                            f"in batch {b}; check the inputs' scale and the model's weights."
                        )
                    sums = result.sums.setdefault(i, MomentSums(x.shape[1], t.shape[1]))
                    sums.add(z)
                result.batches += 1
                result.samples += _batch_size(inputs)
                if progress is not None:
                    progress(b)
    finally:
        gm.train(was_training)
    if result.batches == 0:
        where = f" on rank {rank} of {world}" if distributed else ""
        raise CalibrationError(f"calib_data yielded no batches{where}; pass an iterable of "
                               "batches (at least one per rank).")
    if distributed:
        result.batches, result.samples = dist_calib.all_reduce_sums(
            result.sums, result.batches, result.samples)
    return result


def _batch_size(inputs: Any) -> int:
    t = first_tensor(inputs)
    return int(t.shape[0]) if t is not None and t.ndim else 1


def _instrument(gm: fx.GraphModule, needed: dict[str, int], grid: int
                ) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of ``gm``'s graph (sharing its modules and weights) with a probe after each
    needed node; the probes' forward hooks write pooled activations into ``store``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root = torch.nn.Module()
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b)
    store: dict[str, torch.Tensor] = {}
    probes: list[str] = []
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        if node.name in needed:
            probe_name = f"_surgery_probe_{len(probes)}"
            probes.append(probe_name)
            probe = _Probe()
            axis = needed[node.name]

            def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor, _n=node.name, _a=axis) -> None:
                store[_n] = _pool(out, _a, grid)

            probe.register_forward_hook(hook)
            root.add_module(probe_name, probe)
            graph.call_module(probe_name, (new,))
    return fx.GraphModule(root, graph), store
