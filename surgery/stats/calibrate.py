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

import torch
import torch.nn.functional as F

from surgery._core.batches import as_args, first_tensor, split_batch, to_device
from surgery._core.memory import release_heap
from surgery._core.modes import restore_modes, training_modes
from surgery.errors import CalibrationError
from surgery.graph.groups import OUTPUT, Coupling, Probe
from surgery.stats.moments import MomentSums
from surgery.stats.probes import Features, _align, _columns, _features, _instrument, _linear_target


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

    if isinstance(calib_data, (torch.Tensor, str, bytes, dict)) or not hasattr(calib_data, "__iter__"):
        raise CalibrationError(
            f"calib_data must be an iterable of batches (a list [batch, ...] or a DataLoader), "
            f"got {type(calib_data).__name__}; batches look like example_inputs: "
            f"{expected_inputs(coupling.capture)}."
        )
    distributed = dist_calib.active() if distributed is None else distributed
    rank, world = (dist_calib.rank(), dist_calib.world_size()) if distributed else (0, 1)
    gm = coupling.capture.graph_module
    relations = coupling.relations
    result = Calibration(coupling)
    needed: dict[tuple[str, int], None] = {}
    linear: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, rel in enumerate(relations):
        needed[rel.probe.node, rel.probe.axis] = None
        result.x_features[i] = _features(rel.probe)
        if rel.target != OUTPUT:
            tprobe = rel.target_probe or coupling.probes[rel.target]
            result.t_features[i] = _features(tprobe)
            lin = _linear_target(gm, nodes, rel, result.x_features[i], result.t_features[i])
            if lin is not None:  # the target's sums follow from the input's at the end
                linear[i] = lin
            else:
                needed[tprobe.node, tprobe.axis] = None

    if samples and distributed:
        raise CalibrationError("sample-based MI estimators (binned, ksg) run on one process; "
                               "use estimator='gaussian' for distributed calibration.")
    generator = torch.Generator().manual_seed(seed)
    reads_output = any(rel.target == OUTPUT for rel in relations)
    instrumented, store = _instrument(gm, needed, grid)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    modes = training_modes(gm)
    instrumented.eval()
    try:
        with torch.no_grad():
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
                        f"{expected_inputs(coupling.capture)} (only the batch size N may "
                        "differ)."
                    ) from exc
                top = (top_signal(output, None if labels is None else labels.to(device), target)
                       if reads_output else None)
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                columns: dict[tuple, torch.Tensor] = {}  # probes read by several relations
                if not result.sums:
                    for i, rel in enumerate(relations):
                        dt = (0 if i in linear else top.shape[-1] if rel.target == OUTPUT
                              else len(result.t_features[i].atom_of_column))
                        result.sums[i] = MomentSums(len(result.x_features[i].atom_of_column), dt)
                        result.sums[i].allocate(device)

                def read(probe: Probe, feats: Features) -> torch.Tensor:
                    key = (probe.node, probe.axis, feats.positions.tobytes(), feats.average_atoms)
                    if key not in columns:
                        columns[key] = _columns(store[probe.node, probe.axis], feats)
                    return columns[key]

                for i, rel in enumerate(relations):
                    x = read(rel.probe, result.x_features[i])
                    if i in linear:  # x alone, rows as the reader's output would align
                        t, tnode = x, rel.layer
                    elif rel.target == OUTPUT:
                        t, tnode = top, "the model's output"
                    else:
                        tprobe = rel.target_probe or coupling.probes[rel.target]
                        t, tnode = read(tprobe, result.t_features[i]), tprobe.node
                    x, t = _align(x, t, mask)
                    z = x if i in linear else torch.cat([x, t.to(x.device)], dim=1)
                    sums = result.sums[i]
                    if samples:
                        sums.keep(z, samples, generator)
                    sums.add(z)
                    if not torch.isfinite(sums.total).all():  # any NaN/inf reaches the sum
                        raise CalibrationError(
                            f"non-finite activations (NaN/inf) at {rel.probe.node} or "
                            f"{tnode} in batch {b}; check the inputs' scale and the model's "
                            "weights."
                        )
                result.batches += 1
                result.samples += _batch_size(inputs)
                release_heap()
                if progress is not None:
                    progress(b)
    finally:
        restore_modes(modes)
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


def _example_inputs(capture: Any) -> list[tuple[str, Any]]:
    """(name, example value) for every input of the traced model, in order."""
    placeholders = [n for n in capture.graph_module.graph.nodes if n.op == "placeholder"]
    return [(ph.target.lstrip("*"), v) for ph, v in zip(placeholders, capture.example_args)]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dims = ", ".join(["N", *map(str, value.shape[1:])]) if value.ndim else ""
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape ({dims})"
    text = repr(value)
    return f"a {type(value).__name__} ({text[:40] + '...' if len(text) > 40 else text})"


def expected_inputs(capture: Any) -> str:
    """What a calibration batch must hold, from the example inputs the model was traced with:
    ``x = a float32 tensor of shape (N, 3, 32, 32)``."""
    parts = [f"{name} = {_describe(v)}" for name, v in _example_inputs(capture)
             if isinstance(v, torch.Tensor)]
    return "; ".join(parts) or "no tensor inputs"


def check_batch(b: int, inputs: Any, capture: Any) -> None:
    """Refuse a calibration batch whose inputs cannot be what the model was traced with: wrong
    count or names, not tensors, integer where floating point is expected (or the reverse), a
    different number of dims, or NaN/inf values. Other mismatches (a channel count) surface
    when the batch runs, with the same description of what is expected."""
    expected = _example_inputs(capture)
    args, kwargs = as_args(inputs)
    problems = []
    if len(args) > len(expected):
        problems.append(f"it gives {len(args)} positional inputs and the model takes "
                        f"{len(expected)}")
    names = {name for name, _ in expected}
    problems += [f"it gives an unknown keyword input {k!r}" for k in kwargs if k not in names]
    for i, (name, example) in enumerate(expected):
        if not isinstance(example, torch.Tensor):
            continue
        got = args[i] if i < len(args) else kwargs.get(name, _MISSING)
        if got is _MISSING:
            problems.append(f"input {name!r} is missing")
        elif not isinstance(got, torch.Tensor):
            problems.append(f"input {name!r} is {_describe(got)}, not a tensor")
        elif got.is_floating_point() != example.is_floating_point():
            kind = "a floating-point" if got.is_floating_point() else "an integer/bool"
            problems.append(f"input {name!r} is {kind} tensor ({str(got.dtype)[6:]})")
        elif got.ndim != example.ndim:
            problems.append(f"input {name!r} has {got.ndim} dims, shape {tuple(got.shape)}")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            problems.append(f"input {name!r} contains NaN or inf values")
    if problems:
        raise CalibrationError(
            f"calibration batch {b} does not match the model's inputs: {'; '.join(problems)}. "
            f"Expected {expected_inputs(capture)} (as example_inputs; only the batch size N may "
            "differ). A batch is the inputs, (inputs, labels) with labels a 1-D integer tensor, "
            "or a dict of keyword inputs (with an optional 'labels')."
        )


_MISSING = object()


def _batch_size(inputs: Any) -> int:
    t = first_tensor(inputs)
    return int(t.shape[0]) if t is not None and t.ndim else 1


