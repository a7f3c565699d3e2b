"""Calibration past one process: shard the batches, all-reduce the moment sums.

Calibration statistics are sums (count, sum, outer product per relation), so each rank folds
its share of the batches into its own sums and one all-reduce of a single flat float64 buffer
combines them exactly (up to floating-point summation order). Every rank then runs the same
deterministic scoring on the same sums and derives the same plan; by convention only rank 0
writes files. gloo on CPU, nccl on CUDA, chosen from the device.

Launch with ``torchrun --nproc_per_node N your_script.py`` (and ``--nnodes``/``--rdzv_endpoint``
across machines); every rank passes the same full calibration iterable: batch ``b`` is folded
in by rank ``b % world_size``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from surgery._core.batches import as_args, split_batch, to_device
from surgery._core.modes import evaluating
from surgery.errors import CalibrationError


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def shard(calib_data: Iterable[Any], max_batches: int | None, distributed: bool
          ) -> Iterator[tuple[int, Any]]:
    """``(b, batch)`` for the batches this process folds in: among the first ``max_batches``,
    batch ``b`` goes to rank ``b % world_size`` (every batch when not ``distributed``)."""
    r, world = (rank(), world_size()) if distributed else (0, 1)
    for b, batch in enumerate(calib_data):
        if max_batches is not None and b >= max_batches:
            break
        if b % world == r:
            yield b, batch


def observe(model: torch.nn.Module,
            pre_hooks: dict[torch.nn.Module, Callable[[torch.nn.Module, tuple], None]],
            sums: torch.Tensor, calib_data: Iterable[Any], max_batches: int | None,
            distributed: bool) -> None:
    """Run ``model`` (eval mode, no gradients) over this rank's :func:`shard` of the batches
    with each module's forward pre-hook folding what it sees into ``sums``, then add every
    rank's ``sums`` in place: for statistics of layer inputs that are not moment sums (norm
    gains, the norms' energy shares). A hook must return None (or it replaces the input)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [m.register_forward_pre_hook(hook) for m, hook in pre_hooks.items()]
    try:
        with evaluating(model), torch.no_grad():
            for _, batch in shard(calib_data, max_batches, distributed):
                inputs, _ = split_batch(batch)
                args, kwargs = as_args(to_device(inputs, device))
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if distributed and active():
        dist.all_reduce(sums)


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment variables, with nccl
    for a CUDA device and gloo otherwise. Returns False (and does nothing) outside torchrun."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return dist.is_initialized()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def all_reduce_sums(sums: dict, batches: int, samples: int) -> tuple[int, int]:
    """Add every rank's moment sums in place, with one all-reduce of one flat buffer.

    ``sums`` maps relation index -> :class:`surgery.calibration.MomentSums`; every rank must
    hold the same keys with the same shapes (true when every rank saw at least one batch)."""
    keys = sorted(sums)
    for k in keys:
        sums[k].settle()
    counts = torch.tensor([float(batches), float(samples)] + [float(sums[k].n) for k in keys],
                          dtype=torch.float64)
    shapes = [(k, sums[k].total.numel(), sums[k].outer.numel()) for k in keys]
    device = sums[keys[0]].total.device if keys else torch.device("cpu")
    _check_same_layout(shapes, device)
    flat = torch.cat([counts.to(device)] + [t for k in keys
                                            for t in (sums[k].total, sums[k].outer.reshape(-1))])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = len(counts)
    for i, k in enumerate(keys):
        sums[k].n = int(flat[2 + i].item())
        for name in ("total", "outer"):
            t = getattr(sums[k], name)
            t.copy_(flat[offset:offset + t.numel()].reshape(t.shape))
            offset += t.numel()
    return int(flat[0].item()), int(flat[1].item())


def _check_same_layout(shapes: list[tuple[int, int, int]], device: torch.device) -> None:
    """Refuse to reduce buffers that do not line up (a rank with no batch, another model)."""
    mine = torch.tensor([len(shapes)] + [v for s in shapes for v in s], dtype=torch.float64,
                        device=device)
    size = torch.tensor([float(len(mine))], dtype=torch.float64, device=device)
    biggest = size.clone()
    dist.all_reduce(biggest, op=dist.ReduceOp.MAX)
    padded = torch.zeros(int(biggest.item()), dtype=torch.float64, device=device)
    padded[:len(mine)] = mine
    low, high = padded.clone(), padded.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise CalibrationError(
            f"rank {rank()}: calibration statistics differ in layout across ranks; every rank "
            "must trace the same model with the same example inputs and see at least one "
            f"batch (give at least {world_size()} calibration batches)."
        )


def payload_bytes(sums: dict) -> int:
    """Bytes one all-reduce moves per rank: counts plus every sum and outer product (float64)."""
    return 8 * (2 + len(sums) + sum(s.total.numel() + s.outer.numel() for s in sums.values()))
