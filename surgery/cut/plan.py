"""PruningPlan: what to keep, per group and per parameter dimension, as reproducible JSON.

A plan is self-sufficient for applying: besides the per-group decisions (readable, and what a
report shows), it lists for every parameter dimension touched the positions kept. Applying a
plan therefore needs no tracing, so a saved plan can rebuild a pruned model from the
architecture alone. The model fingerprint (parameter names and shapes) guards against
applying a plan to a different model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.errors import PlanError

PLAN_VERSION = 1


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class and its parameter/buffer names and shapes."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
    return h.hexdigest()[:16]


def _to_ranges(positions: list[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]]: compact JSON for mostly-contiguous kept indices."""
    ranges: list[list[int]] = []
    for p in positions:
        if ranges and ranges[-1][1] == p:
            ranges[-1][1] = p + 1
        else:
            ranges.append([p, p + 1])
    return ranges


def _from_ranges(ranges: list[list[int]]) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


@dataclass
class GroupDecision:
    """The kept atoms of one channel group, with its size and (optionally) atom scores."""

    id: int
    name: str
    kind: str
    atoms: int
    kept: list[int]
    scores: list[float] | None = None


@dataclass
class PruningPlan:
    """Per-group kept atoms plus per-parameter kept positions; see the module docstring."""

    fingerprint: str
    criterion: str
    target: str
    budget: dict[str, Any]
    groups: list[GroupDecision]
    keep: dict[str, dict[int, list[int]]]
    shapes: dict[str, list[int]]
    model_class: str = ""
    version: int = PLAN_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- summaries --------------------------------------------------------------------------
    def kept_fraction(self) -> float:
        total = sum(g.atoms for g in self.groups)
        return sum(len(g.kept) for g in self.groups) / total if total else 1.0

    def kinds(self) -> dict[str, tuple[int, int, int]]:
        """Per group kind: (groups, atoms kept, atoms in all)."""
        out: dict[str, list[int]] = {}
        for g in self.groups:
            entry = out.setdefault(g.kind, [0, 0, 0])
            entry[0] += 1
            entry[1] += len(g.kept)
            entry[2] += g.atoms
        return {k: (a, b, c) for k, (a, b, c) in out.items()}

    def layer_params(self) -> dict[str, tuple[int, int]]:
        """Per module (the owner of each parameter or buffer the plan slices or not): parameter
        entries (dense, kept), exact, from the recorded shapes and kept positions."""
        out: dict[str, list[int]] = {}
        for name, shape in self.shapes.items():
            if not name.endswith(("weight", "bias")):  # running statistics are not parameters
                continue
            dense = math.prod(shape)
            kept = dense
            for dim, positions in self.keep.get(name, {}).items():
                kept = kept * len(positions) // shape[dim]
            entry = out.setdefault(name.rpartition(".")[0] or "(model)", [0, 0])
            entry[0] += dense
            entry[1] += kept
        return {k: (a, b) for k, (a, b) in out.items()}

    def summary(self) -> str:
        """What the plan cuts, as a plain-text table a person reads: per group kind (groups,
        atoms kept/total) and per layer that changes (parameters and MACs, dense -> kept)."""
        lines = [repr(self), "", f"{'kind':<10}{'groups':>8}{'kept / atoms':>18}"]
        for kind, (groups, kept, atoms) in self.kinds().items():
            lines.append(f"{kind:<10}{groups:>8}{f'{kept} / {atoms}':>18} ({kept / atoms:.0%})")
        macs = self.extra.get("layer_macs", {})
        params = self.layer_params()
        changed = [m for m in dict.fromkeys([*params, *macs])
                   if params.get(m, (0, 0))[0] != params.get(m, (0, 0))[1]
                   or macs.get(m, (0, 0))[0] != macs.get(m, (0, 0))[1]]
        width = max([len(m) for m in changed] + [5])
        lines += ["", f"{'layer':<{width}}{'params':>24}{'MACs / sample':>28}"]
        for m in changed:
            p, c = params.get(m), macs.get(m)
            lines.append(f"{m:<{width}}{_pair(p):>24}{_pair(c):>28}")
        if not changed:
            lines.append("(no layer changes)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        kept = sum(len(g.kept) for g in self.groups)
        atoms = sum(g.atoms for g in self.groups)
        b = self.budget
        cost = "".join(f", {label} {_short(b[f'dense_{what}'])} -> "
                       f"{_short(b[f'estimated_{what}'])}"
                       for what, label in (("params", "params"), ("macs", "MACs"))
                       if f"dense_{what}" in b)
        return (f"PruningPlan({self.model_class.rpartition('.')[2] or 'model'}, "
                f"criterion={self.criterion!r}, {len(self.groups)} groups, {kept}/{atoms} atoms "
                f"kept ({self.kept_fraction():.0%}){cost})")

    # ---- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep"] = {p: {str(dim): _to_ranges(pos) for dim, pos in dims.items()}
                     for p, dims in self.keep.items()}
        for g in d["groups"]:
            g["kept"] = _to_ranges(g["kept"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningPlan":
        if not isinstance(d, dict):
            raise PlanError(f"malformed pruning plan: expected a JSON object, got "
                            f"{type(d).__name__}; is this a plan file?")
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(
                    f"plan version {d.get('version')!r} is not supported (this surgery reads "
                    f"version {PLAN_VERSION}); re-create the plan with this version."
                )
            groups = [GroupDecision(**{**g, "kept": _from_ranges(g["kept"])}) for g in d["groups"]]
            keep = {p: {int(dim): _from_ranges(r) for dim, r in dims.items()}
                    for p, dims in d["keep"].items()}
            return cls(
                fingerprint=d["fingerprint"], criterion=d["criterion"], target=d["target"],
                budget=d["budget"], groups=groups, keep=keep, shapes=d["shapes"],
                model_class=d.get("model_class", ""), version=d["version"],
                extra=d.get("extra", {}),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(
                f"malformed pruning plan: missing or wrong field ({type(exc).__name__}: {exc}); "
                "the file is corrupt or was edited by hand. Re-create it with make_plan."
            ) from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"the plan is not valid JSON ({exc}); is the file truncated?") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, then a rename. Nothing is
        written when the plan cannot be serialised or the folder does not exist."""
        path = Path(path)
        if not path.parent.is_dir():
            raise PlanError(f"cannot save the plan to {str(path)!r}: the folder "
                            f"{str(path.parent)!r} does not exist; create it first.")
        if path.is_dir():
            raise PlanError(f"cannot save the plan to {str(path)!r}: it is a folder; give a "
                            "file name such as plan.json.")
        try:
            text = self.to_json()
        except (TypeError, ValueError) as exc:
            raise PlanError(
                f"the plan cannot be written as JSON ({exc}); budget and extra may only hold "
                "numbers, strings, lists and dicts."
            ) from exc
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        try:
            text = Path(path).read_text()
        except FileNotFoundError as exc:
            raise PlanError(f"no plan file at {str(path)!r}.") from exc
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise PlanError(f"{str(path)!r} is not a plan file ({type(exc).__name__}: {exc}); "
                            "give the path of a plan.json written by PruningPlan.save.") from exc
        return cls.from_json(text)


def _pair(value: tuple[int, int] | list[int] | None) -> str:
    if value is None:
        return "-"
    dense, kept = value
    return f"{_short(dense)} -> {_short(kept)}" + (f" ({kept / dense:.0%})" if dense else "")


def _short(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _check_kept(coupling: Any, kept: dict[int, Any]) -> None:
    """Refuse kept atoms that would empty a group, fall outside it, repeat, or name a group
    that cannot be cut."""
    prunable = {g.id: g for g in coupling.groups if g.prunable}
    for gid, atoms in kept.items():
        if gid not in prunable:
            known = gid in {g.id for g in coupling.groups}
            raise PlanError(
                f"kept atoms given for group {gid!r}, which "
                + (f"cannot be cut ({coupling.groups[gid].reason})" if known else "does not exist")
                + f"; prunable groups are {sorted(prunable)}."
            )
        g = prunable[gid]
        arr = np.asarray(atoms)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise PlanError(f"kept atoms of group {g.name!r} must be a list of integers, got "
                            f"{arr.dtype} with shape {arr.shape}.")
        if arr.size == 0:
            raise PlanError(f"the plan would empty group {g.name!r} ({g.atoms} atoms); keep at "
                            "least one atom of every group (min_keep >= 1).")
        if arr.min() < 0 or arr.max() >= g.atoms or len(np.unique(arr)) != arr.size:
            raise PlanError(f"kept atoms of group {g.name!r} must be distinct indices in "
                            f"[0, {g.atoms}); got {arr.tolist()}.")


def build_plan(
    coupling: Any,
    kept: dict[int, np.ndarray],
    *,
    criterion: str,
    target: str,
    budget: dict[str, Any],
    scores: dict[int, np.ndarray] | None = None,
) -> PruningPlan:
    """Turn per-group kept atoms into a plan (kept positions for every parameter dimension)."""
    model = coupling.capture.model
    _check_kept(coupling, kept)
    removed: dict[tuple[str, int], set[int]] = {}
    decisions = []
    for g in coupling.groups:
        if not g.prunable:
            continue
        keep_atoms = np.sort(np.asarray(kept.get(g.id, np.arange(g.atoms)), dtype=np.int64))
        drop = np.setdiff1d(np.arange(g.atoms), keep_atoms)
        for key, per_atom in g.slices.items():
            bucket = removed.setdefault(key, set())
            for a in drop.tolist():
                bucket.update(per_atom[a].tolist())
        s = scores.get(g.id) if scores else None
        decisions.append(GroupDecision(
            g.id, g.name, g.kind, g.atoms, keep_atoms.tolist(),
            None if s is None else [float(x) for x in s],
        ))
    state = model.state_dict()
    keep: dict[str, dict[int, list[int]]] = {}
    for (param, dim), positions in sorted(removed.items()):
        size = state[param].shape[dim]
        keep.setdefault(param, {})[dim] = [i for i in range(size) if i not in positions]
    return PruningPlan(
        fingerprint=fingerprint(model), criterion=criterion, target=target, budget=budget,
        groups=decisions, keep=keep,
        shapes={k: list(v.shape) for k, v in state.items()},
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )
