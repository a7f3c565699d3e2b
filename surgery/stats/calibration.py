"""Calibration: stream real batches through the model and fold them into moment sums.

Scoring a group needs, for each layer that reads it, the joint second moments of the group's
channels (as that layer sees them) and of the channels that layer writes. Those are sums, so
each batch is folded in and dropped: activations are never all held. Where to look and how a
tensor becomes rows is :mod:`surgery.stats._probes`; the sums are :mod:`surgery.stats.moments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from surgery._core.batches import as_args, first_tensor, rows, split_batch, to_device
from surgery._core.memory import release_heap
from surgery._core.modes import evaluating
from surgery.errors import CalibrationError
from surgery.graph.groups import OUTPUT, Coupling, Probe
from surgery.stats._batch_check import check_batch, expected_inputs
from surgery.stats._probes import Features, align, columns, features_of, instrument, linear_target
from surgery.stats.moments import MomentSums


@dataclass
class Calibration:
    """Moment sums per relation (index into ``coupling.relations``) and the features layout."""

    coupling: Coupling
    sums: dict[int, MomentSums] = field(default_factory=dict)
    x_features: dict[int, Features] = field(default_factory=dict)
    t_features: dict[int, Features] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0


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
    samples: int = 0,
    seed: int = 0,
) -> Calibration:
    """Fold ``calib_data`` into moment sums for every relation of ``coupling``.

    ``samples > 0`` also keeps that many rows per relation, drawn uniformly (seeded by
    ``seed``), for estimators that work on samples; on one process only.

    Under ``torch.distributed`` (``distributed=None`` detects an initialised group), rank r
    folds in batches r, r + world, ... and the sums are all-reduced at the end, so every
    rank returns the statistics of the whole data set."""
    from surgery.stats import distributed as dist_calib

    if (isinstance(calib_data, (torch.Tensor, str, bytes, dict))
            or not hasattr(calib_data, "__iter__")):
        raise CalibrationError(
            f"calib_data must be an iterable of batches (a list [batch, ...] or a DataLoader), "
            f"got {type(calib_data).__name__}; batches look like example_inputs: "
            f"{expected_inputs(coupling.capture)}."
        )
    distributed = dist_calib.active() if distributed is None else distributed
    rank, world = (dist_calib.rank(), dist_calib.world_size()) if distributed else (0, 1)
    if samples and distributed:
        raise CalibrationError("sample-based MI estimators (binned, ksg) run on one process; "
                               "use estimator='gaussian' for distributed calibration.")
    result, linear, needed = _layout(coupling)
    gm = coupling.capture.graph_module
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    with instrument(gm, needed, grid) as (instrumented, store), evaluating(instrumented), \
            torch.no_grad():
        fold = _Fold(result, linear, store, target, samples, seed, device)
        for b, batch in enumerate(calib_data):
            if max_batches is not None and b >= max_batches:
                break
            if b % world != rank:
                continue
            inputs, labels = split_batch(batch)
            check_batch(b, inputs, coupling.capture)
            inputs = to_device(inputs, device)
            store.clear()
            args, kwargs = as_args(inputs)
            try:
                output = instrumented(*args, **kwargs)
            except Exception as exc:
                raise CalibrationError(
                    f"calibration batch {b} does not run through the model: "
                    f"{type(exc).__name__}: {exc}. Batches must look like example_inputs: "
                    f"{expected_inputs(coupling.capture)} (only the batch size N may differ)."
                ) from exc
            fold(b, inputs, output, labels)
            release_heap()
            if progress is not None:
                progress(b)
    if result.batches == 0:
        where = f" on rank {rank} of {world}" if distributed else ""
        raise CalibrationError(f"calib_data yielded no batches{where}; pass an iterable of "
                               "batches (at least one per rank).")
    if distributed:
        result.batches, result.samples = dist_calib.all_reduce_sums(
            result.sums, result.batches, result.samples)
    for i, (weight, bias) in linear.items():
        result.sums[i] = result.sums[i].with_linear_target(weight, bias)
    return result


def _layout(coupling: Coupling) -> tuple[Calibration, dict[int, tuple[torch.Tensor, Any]],
                                         dict[tuple[str, int], None]]:
    """The empty result with each relation's feature layout, the relations whose target is a
    linear function of their input (weight rows, bias), and the (node, axis) pairs to probe."""
    gm = coupling.capture.graph_module
    result = Calibration(coupling)
    needed: dict[tuple[str, int, str | None], None] = {}
    linear: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, rel in enumerate(coupling.relations):
        needed[rel.probe.key] = None
        result.x_features[i] = features_of(rel.probe)
        if rel.target != OUTPUT:
            tprobe = rel.target_probe or coupling.probes[rel.target]
            result.t_features[i] = features_of(tprobe)
            lin = linear_target(gm, nodes, rel, result.x_features[i], result.t_features[i])
            if lin is not None:  # the target's sums follow from the input's at the end
                linear[i] = lin
            else:
                needed[tprobe.key] = None
    return result, linear, needed


class _Fold:
    """Folds one batch's probed activations into every relation's moment sums."""

    def __init__(self, result: Calibration, linear: dict, store: dict, target: str,
                 samples: int, seed: int, device: torch.device) -> None:
        self.result, self.linear, self.store = result, linear, store
        self.target, self.samples, self.device = target, samples, device
        self.generator = torch.Generator().manual_seed(seed)
        self.reads_output = any(rel.target == OUTPUT for rel in result.coupling.relations)

    def __call__(self, b: int, inputs: Any, output: Any, labels: torch.Tensor | None) -> None:
        result, relations = self.result, self.result.coupling.relations
        if self.target == "labels" and labels is not None and len(labels) != rows(inputs):
            raise CalibrationError(
                f"calibration batch {b} has {len(labels)} labels for {rows(inputs)} inputs; "
                "each batch must carry one label per input (a 1-D integer tensor).")
        top = (top_signal(output, None if labels is None else labels.to(self.device),
                          self.target) if self.reads_output else None)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if not result.sums:
            self._allocate(top)
        cache: dict[tuple, torch.Tensor] = {}  # probes read by several relations

        def read(probe: Probe, feats: Features) -> torch.Tensor:
            key = (probe.key, feats.positions.tobytes(), feats.average_atoms)
            if key not in cache:
                pooled = self.store[probe.key]
                if pooled.shape[-1] != len(probe.atom_of_position):
                    where = probe.module or probe.node
                    raise CalibrationError(
                        f"the input of {where} has {pooled.shape[-1]} channels on axis "
                        f"{probe.axis} where the channel rule placed "
                        f"{len(probe.atom_of_position)}: the rule describing it (a plugin's "
                        "HeadLayout?) does not match the module.")
                cache[key] = columns(pooled, feats)
            return cache[key]

        for i, rel in enumerate(relations):
            x = read(rel.probe, result.x_features[i])
            if i in self.linear:  # x alone, rows as the reader's output would align
                t, tnode = x, rel.layer
            elif rel.target == OUTPUT:
                t, tnode = top, "the model's output"
            else:
                tprobe = rel.target_probe or result.coupling.probes[rel.target]
                t, tnode = read(tprobe, result.t_features[i]), tprobe.node
            x, t = align(x, t, mask)
            z = x if i in self.linear else torch.cat([x, t.to(x.device)], dim=1)
            sums = result.sums[i]
            if self.samples:
                sums.keep(z, self.samples, self.generator)
            sums.add(z)
            if not torch.isfinite(sums.total).all():  # any NaN/inf reaches the sum
                raise CalibrationError(
                    f"non-finite activations (NaN/inf) at {rel.probe.node} or {tnode} in batch "
                    f"{b}; check the inputs' scale and the model's weights."
                )
        result.batches += 1
        result.samples += rows(inputs) or 1

    def _allocate(self, top: torch.Tensor | None) -> None:
        """Every relation's sums, before the first batch's temporaries (see MomentSums)."""
        result = self.result
        for i, rel in enumerate(result.coupling.relations):
            dt = (0 if i in self.linear else top.shape[-1] if rel.target == OUTPUT
                  else len(result.t_features[i].atom_of_column))
            result.sums[i] = MomentSums(len(result.x_features[i].atom_of_column), dt)
            result.sums[i].allocate(self.device)
