"""Calibration: stream real batches through the model and fold them into moment sums.

Scoring a group needs, for each layer that reads it, the joint second moments of the group's
channels (as that layer sees them) and of the channels that layer writes. Those are sums, so
each batch is folded in and dropped: activations are never all held. Where to look and how a
tensor becomes rows is :mod:`surgery.stats._probes`; the sums are :mod:`surgery.stats.moments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from surgery._core.batches import as_args, first_tensor, rows, split_batch, to_device
from surgery._core.memory import release_heap
from surgery._core.modes import evaluating
from surgery.errors import CalibrationError
from surgery.graph.groups import OUTPUT, Coupling, Probe
from surgery.stats._batch_check import check_batch, expected_inputs
from surgery.stats._probes import (
    Features,
    align,
    columns,
    features_of,
    instrument,
    linear_target,
    observed_target,
)
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
    relations: Collection[int] | None = None,
) -> Calibration:
    """Fold ``calib_data`` into moment sums for every relation of ``coupling`` (or only those
    indexed in ``relations``: staged calibration holds a few groups' statistics at a time).

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
    result, linear, needed = _layout(coupling, relations)
    gm = coupling.capture.graph_module
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    with instrument(gm, needed, grid) as (instrumented, store), evaluating(instrumented), \
            torch.no_grad():
        fold = _Fold(result, linear, store, target, samples, seed, device, distributed)
        for b, batch in dist_calib.shard(calib_data, max_batches, distributed):
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


def _layout(coupling: Coupling, relations: Collection[int] | None = None
            ) -> tuple[Calibration, dict[int, tuple[torch.Tensor, Any]],
                       dict[tuple[str, int, str | None], None]]:
    """The empty result with each relation's feature layout, the relations whose target is a
    linear function of their input (weight rows, bias), and the probes to place."""
    gm = coupling.capture.graph_module
    result = Calibration(coupling)
    needed: dict[tuple[str, int, str | None], None] = {}
    linear: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    chosen = range(len(coupling.relations)) if relations is None else sorted(relations)
    for i in chosen:
        rel = coupling.relations[i]
        needed[rel.probe.key] = None
        result.x_features[i] = features_of(rel.probe)
        if rel.target != OUTPUT:
            tprobe = rel.target_probe or coupling.probes[rel.target]
            result.t_features[i] = features_of(tprobe)
            lin = linear_target(gm, nodes, rel, result.x_features[i], result.t_features[i])
            if lin is not None:  # the target's sums follow from the input's at the end
                linear[i] = lin
            else:
                tprobe = observed_target(coupling, rel)
                result.t_features[i] = features_of(tprobe)
                needed[tprobe.key] = None
    return result, linear, needed


class _Fold:
    """Folds one batch's probed activations into every relation's moment sums."""

    def __init__(self, result: Calibration, linear: dict, store: dict, target: str,
                 samples: int, seed: int, device: torch.device, distributed: bool = False
                 ) -> None:
        self.result, self.linear, self.store = result, linear, store
        self.target, self.samples, self.device = target, samples, device
        self.generator = torch.Generator().manual_seed(seed)
        self.indices = list(result.x_features)
        self.reads_output = any(result.coupling.relations[i].target == OUTPUT
                                for i in self.indices)
        self.tokens: torch.Tensor | None = None  # columns of a wide output kept as the target
        self.distributed = distributed

    def __call__(self, b: int, inputs: Any, output: Any, labels: torch.Tensor | None) -> None:
        result, relations = self.result, self.result.coupling.relations
        if self.target == "labels" and labels is not None and len(labels) != rows(inputs):
            raise CalibrationError(
                f"calibration batch {b} has {len(labels)} labels for {rows(inputs)} inputs; "
                "each batch must carry one label per input (a 1-D integer tensor).")
        top = (top_signal(output, None if labels is None else labels.to(self.device),
                          self.target) if self.reads_output else None)
        if top is not None and top.shape[-1] > TOP_COLUMNS:
            top = self._sketch(top)
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

        for i in self.indices:
            rel = relations[i]
            x = read(rel.probe, result.x_features[i])
            if i in self.linear:  # x alone, rows as the reader's output would align
                t, tnode = x, rel.layer
            elif rel.target == OUTPUT:
                t, tnode = top, "the model's output"
            else:
                tprobe = observed_target(result.coupling, rel)
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
        for i in self.indices:
            rel = result.coupling.relations[i]
            dt = (0 if i in self.linear else top.shape[-1] if rel.target == OUTPUT
                  else len(result.t_features[i].atom_of_column))
            result.sums[i] = MomentSums(len(result.x_features[i].atom_of_column), dt)
            result.sums[i].allocate(self.device)

    def _sketch(self, top: torch.Tensor) -> torch.Tensor:
        """A wide output (a language model's 49k-way next-token scores) as the log-probabilities
        of the ``TOP_TOKENS`` outputs most probable on the first batch, plus the log of the rest
        of the mass. Moment sums of 49k columns would need 19 GB; these keep the part of the
        output distribution the model actually uses. One-hot labels are cut the same way."""
        if self.target == "labels":
            self._choose(top)
            kept = top.index_select(-1, self.tokens)
            return torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1)
        logp = torch.log_softmax(top, -1)
        self._choose(logp.exp())
        kept = logp.index_select(-1, self.tokens)
        rest = torch.log1p(-kept.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-6))
        return torch.cat([kept, rest], -1)

    def _choose(self, probabilities: torch.Tensor) -> None:
        """The kept columns, once: the most probable on this process's first batch, and under
        torch.distributed rank 0's choice on every rank (their sums must line up)."""
        if self.tokens is not None:
            return
        mass = probabilities.reshape(-1, probabilities.shape[-1]).mean(0)
        self.tokens = mass.topk(TOP_TOKENS).indices
        if self.distributed:
            import torch.distributed as dist

            dist.broadcast(self.tokens, src=0)


TOP_COLUMNS = 4096
"""Widest model output used as the top signal as it is; wider ones are sketched (_Fold)."""
TOP_TOKENS = 255
"""Output columns a sketched top signal keeps (plus one for the rest of the mass)."""


def calibration_bytes(coupling: Coupling, relations: Collection[int] | None = None
                      ) -> dict[int, int]:
    """Bytes the moment sums of each relation will hold (float64), from the layout alone: what
    staged calibration plans its stages with."""
    result, linear, _ = _layout(coupling, relations)
    output_width = _output_width(coupling)
    out = {}
    for i in result.x_features:
        dx = len(result.x_features[i].atom_of_column)
        rel = coupling.relations[i]
        dt = (0 if i in linear else min(output_width, TOP_TOKENS + 1) if rel.target == OUTPUT
              and output_width > TOP_COLUMNS else output_width if rel.target == OUTPUT
              else len(result.t_features[i].atom_of_column))
        out[i] = 8 * (dx + dt) * (dx + dt + 1)
    return out


def _output_width(coupling: Coupling) -> int:
    """The last dim of the model's first output tensor, from the traced shapes."""
    output = next(n for n in coupling.capture.graph_module.graph.nodes if n.op == "output")
    for node in tree_leaves(output.args):
        meta = getattr(node, "meta", {}).get("tensor_meta")
        if hasattr(meta, "shape") and len(meta.shape):
            return int(meta.shape[-1])
    return 1
