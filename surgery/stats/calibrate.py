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

import ctypes
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from surgery._core.modes import restore_modes, training_modes
from surgery.errors import CalibrationError
from surgery.graph.groups import OUTPUT, Coupling, Probe
from surgery._core.batches import as_args, first_tensor, to_device

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
    """Running sums over samples of z = [x, t]: count, sum and outer product (float64).

    Each batch is centred on its own mean before its outer product, which then runs in
    float32 (the bulk of calibration time; twice float64's speed on CPUs) without losing the
    small variations of channels with large means, and only its upper block triangle is
    computed (``outer``'s upper triangle is exact, the lower one is not kept: :meth:`gram`
    mirrors it). The exact identity ``sum z z^T = sum zc zc^T + n m m^T`` folds the batch
    means back in, ``FOLD`` batches at a time in one product."""

    dx: int
    dt: int
    n: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    pending: list[torch.Tensor] = field(default_factory=list, repr=False)
    """Sums of the batches whose ``n m m^T`` term is not yet in ``outer``."""
    whole: bool = False
    """Whether ``outer``'s lower triangle is filled in (see :meth:`gram`)."""
    reservoir: torch.Tensor | None = field(default=None, repr=False)
    """Up to ``limit`` rows of z kept uniformly at random (reservoir sampling), for the
    estimators that need samples, not moments (binned, k-NN); None when not asked for."""

    def keep(self, z: torch.Tensor, limit: int, generator: torch.Generator) -> None:
        """Reservoir sampling (algorithm R) of ``z``'s rows; call before :meth:`add`."""
        z = z.float()
        if self.reservoir is None:
            self.reservoir = z.new_empty(0, z.shape[1])
        room = max(0, limit - len(self.reservoir))
        if room:
            self.reservoir = torch.cat([self.reservoir, z[:room]])
        rest = z[room:]
        if len(rest):
            index = self.n + room + torch.arange(len(rest))  # each row's rank among all rows
            slot = (torch.rand(len(rest), generator=generator) * (index + 1)).long()
            hit = slot < limit
            self.reservoir[slot[hit].to(z.device)] = rest[hit.to(z.device)]

    def rows(self) -> torch.Tensor:
        """The kept samples of z = [x, t] (see ``reservoir``)."""
        if self.reservoir is None:
            raise ValueError("no samples were kept: calibrate with samples > 0 (estimators "
                             "that need samples ask for them through surgery.prune).")
        return self.reservoir

    def allocate(self, device: torch.device) -> None:
        """Zero sums for ``dx + dt`` columns (done for every relation before the first batch's
        temporaries, so the long-lived buffers do not fragment the heap between them)."""
        d = self.dx + self.dt
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=device)

    FOLD = 64

    def add(self, z: torch.Tensor) -> None:
        if self.total is None:
            self.allocate(z.device)
        if not len(z):
            return
        total = z.sum(0, dtype=torch.float64)
        self.n += z.shape[0]
        self.total += total
        self.whole = False
        _add_upper_gram(self.outer, z.float() - (total / z.shape[0]).float())
        self.pending.append(total / math.sqrt(z.shape[0]))  # n m m^T = (s/sqrt n)(s/sqrt n)^T
        if len(self.pending) >= self.FOLD:
            self.settle()

    def settle(self) -> None:
        """Fold the pending batch means into ``outer`` (before it is read or reduced)."""
        if self.pending:
            m = torch.stack(self.pending)
            self.outer += m.T @ m
            self.pending.clear()

    def gram(self) -> torch.Tensor:
        """sum z z^T, whole: ``outer``'s upper triangle is mirrored in place once the batches
        are in (until the next :meth:`add`)."""
        self.settle()
        if not self.whole:
            upper = self.outer.triu(1)
            self.outer.triu_()
            self.outer += upper.T
            self.whole = True
        return self.outer

    def with_linear_target(self, weight: torch.Tensor, bias: torch.Tensor | None) -> "MomentSums":
        """The statistics of z = [x, t] when t = weight @ x + bias exactly (a linear layer or
        1x1 conv reading all of x, observed at its own output), from the sums of x alone:
        the t blocks need no samples, which saves most of calibration's work on wide
        layers, and are derived when asked for, so they take no memory meanwhile."""
        self.gram()
        return LinearTargetSums(self.dx, weight.shape[0], self.n, self.total, self.outer,
                                whole=True, reservoir=self.reservoir,
                                weight=weight.detach().clone(),
                                bias=None if bias is None else bias.detach().clone())

    def covariance(self) -> torch.Tensor:
        mean = self.total / self.n
        return torch.addr(self.gram(), mean, mean, beta=1.0 / self.n, alpha=-1.0)

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def blocks(self, t_cols: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(Cov(x), Cov(x, t_S), Cov(t_S)) for the t columns ``t_cols``; None, None when
        ``t_cols`` is None (x alone, as compensation needs)."""
        cov = self.covariance()
        dx = self.dx
        if t_cols is None:
            return cov[:dx, :dx], None, None
        t = torch.as_tensor(dx + np.asarray(t_cols, dtype=np.int64), device=cov.device)
        return (cov[:dx, :dx], cov[:dx].index_select(1, t),
                cov.index_select(0, t).index_select(1, t))


def _add_upper_gram(out: torch.Tensor, z: torch.Tensor, block: int = 192) -> None:
    """``out += z^T z`` on and above the diagonal blocks only (float32 products added to
    float64): wide layers' products cost about 60% of the whole one."""
    d = z.shape[1]
    if d < 2 * block:
        out += z.T @ z
        return
    for lo in range(0, d, block):
        out[lo:lo + block, lo:] += z[:, lo:lo + block].T @ z[:, lo:]


@dataclass
class LinearTargetSums(MomentSums):
    """Sums of x only (``total``, ``outer`` are x's) with t = ``weight`` @ x + ``bias``; the
    covariance and mean of [x, t] are computed on request (exact, no sampling noise)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def _map(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.to(self.outer.device, torch.float64).reshape(self.dt, self.dx)
        b = (torch.zeros(self.dt, dtype=torch.float64, device=w.device) if self.bias is None
             else self.bias.to(w.device, torch.float64))
        return w, b

    def blocks(self, t_cols: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """As :meth:`MomentSums.blocks`, from the selected rows of the weight only."""
        c_xx = super().covariance()
        if t_cols is None:
            return c_xx, None, None
        w, _ = self._map()
        w = w.index_select(0, torch.as_tensor(np.asarray(t_cols, dtype=np.int64), device=w.device))
        c_xt = c_xx @ w.T
        c_tt = w @ c_xt
        return c_xx, c_xt, (c_tt + c_tt.T) / 2

    def covariance(self) -> torch.Tensor:
        c_xx, c_xt, c_tt = self.blocks(np.arange(self.dt))
        return torch.cat([torch.cat([c_xx, c_xt], 1), torch.cat([c_xt.T, c_tt], 1)], 0)

    def mean(self) -> torch.Tensor:
        w, b = self._map()
        m = super().mean()
        return torch.cat([m, w @ m + b])

    def rows(self) -> torch.Tensor:
        x = super().rows()
        w, b = self._map()
        return torch.cat([x, (x.double() @ w.T + b).float()], 1)


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
    if len(feats.positions) == pooled.shape[-1] and (feats.positions == np.arange(len(
            feats.positions))).all():
        cols = pooled  # every position is read (the usual case): no copy
    else:
        cols = pooled.index_select(-1, torch.as_tensor(feats.positions, device=pooled.device))
    if not feats.average_atoms:
        return cols
    column = np.searchsorted(feats.atom_of_column, feats.position_atoms)
    index = torch.as_tensor(column, device=pooled.device)
    out = torch.zeros(*cols.shape[:-1], len(feats.atom_of_column), device=cols.device)
    out.index_add_(-1, index, cols)
    return out / torch.bincount(index).clamp_min(1)


def _align(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of samples for both sides: per position when layouts agree, else per example.

    ``mask`` (batch, tokens), from an ``attention_mask`` input, drops padding tokens from
    token-level rows and from per-example means: padding would otherwise dominate the
    statistics of short texts."""
    if x.shape[:-1] == t.shape[:-1]:
        rows = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
        if mask is not None and x.shape[:-1] == mask.shape:
            keep = mask.reshape(-1).nonzero().squeeze(1)
            rows = lambda v: v.reshape(-1, v.shape[-1]).index_select(0, keep)  # noqa: E731
        x_rows = rows(x)
        return x_rows, x_rows if t is x else rows(t)
    return _per_example(x, mask), _per_example(t, mask)


def _per_example(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if v.ndim <= 2:
        return v
    if mask is not None and v.shape[:-1] == mask.shape:
        w = mask.to(v.dtype).unsqueeze(-1)
        return (v * w).sum(1) / w.sum(1).clamp_min(1)
    return v.mean(dim=tuple(range(1, v.ndim - 1)))


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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each batch allocates and frees large temporaries of many sizes; glibc raises its mmap
    threshold after such frees and then serves them from a heap that fragments and keeps
    growing (resnet50d: +0.4 GB of peak RSS over the 256 images). Trimming once per batch
    costs milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _linear_target(gm: fx.GraphModule, nodes: dict[str, fx.Node], rel: Any, xf: Features,
                   tf: Features) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight rows, bias) when the relation's target is exactly a linear function of its
    probed input: an ``nn.Linear`` or 1x1 convolution (stride 1, no padding: its output keeps
    the input's positions, so pooling both alike commutes with it) that the probe sees whole
    (every input feature) and whose own output is the target probe; else None."""
    if rel.target_probe is None or rel.target_probe.node != rel.layer:
        return None
    node = nodes.get(rel.layer)
    if node is None or node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    pointwise = (type(module) in (torch.nn.Conv1d, torch.nn.Conv2d)
                 and all(k == 1 for k in module.kernel_size) and module.groups == 1
                 and all(v == 1 for v in (*module.stride, *module.dilation))
                 and all(p == 0 for p in module._reversed_padding_repeated_twice))
    if type(module) is not torch.nn.Linear and not pointwise:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.name != rel.probe.node:
        return None
    in_meta, out_meta = source.meta.get("tensor_meta"), node.meta.get("tensor_meta")
    if not hasattr(in_meta, "shape") or not hasattr(out_meta, "shape"):
        return None
    width = module.weight.shape[1]
    axis = 1 if pointwise else len(in_meta.shape) - 1  # where the layer reads its features
    whole = (not xf.average_atoms and len(xf.positions) == width
             and (xf.positions == np.arange(width)).all())
    if (not whole or tf.average_atoms or rel.probe.axis != axis
            or rel.target_probe.axis != (1 if pointwise else len(out_meta.shape) - 1)):
        return None
    rows = torch.as_tensor(tf.positions, device=module.weight.device)
    bias = None if module.bias is None else module.bias.detach().index_select(0, rows)
    return module.weight.detach().index_select(0, rows), bias


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


def _instrument(gm: fx.GraphModule, needed: dict[tuple[str, int], None], grid: int
                ) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of ``gm``'s graph (sharing its modules and weights) with a probe after each
    needed node; the probes' forward hooks write pooled activations into ``store``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # GraphModule looks each get_attr/call_module target up in a dict root: the traced
    # model's objects (modules, weights, graph constants) and the new probes.
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            root[node.target] = obj
    store: dict[tuple[str, int], torch.Tensor] = {}
    probes: list[str] = []
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        for axis in [a for (n, a) in needed if n == node.name]:
            probe_name = f"_surgery_probe_{len(probes)}"
            probes.append(probe_name)
            probe = _Probe()

            def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor, _n=node.name,
                     _a=axis) -> None:
                store[_n, _a] = _pool(out, _a, grid)

            probe.register_forward_hook(hook)
            root[probe_name] = probe
            graph.call_module(probe_name, (new,))
    return fx.GraphModule(root, graph), store
