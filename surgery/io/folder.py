"""Saving and reloading pruned models: safetensors weights, the plan, the base architecture.

A saved pruned model is a folder::

    model.safetensors   the pruned weights (safetensors; shared tensors stored once)
    plan.json           the PruningPlan that made it (what every parameter kept)
    surgery.json        format version, how to rebuild the *unpruned* architecture, and the
                        size and sha256 of the two files above
    config.json         Hugging Face models only, when the updated config describes the pruned
                        model: the folder then also loads with ``from_pretrained``
    tokenizer files     when a tokenizer is given (``tokenizer=``), as its ``save_pretrained``
                        writes them: a plain folder is then complete (transformers 5 builds an
                        empty vocabulary from a config alone)

:func:`load` rebuilds the unpruned architecture (no weights needed), slices it with the plan
(:func:`surgery.cut.apply.slice_model`, no tracing, the same fix-ups as pruning) and loads
the weights. Nothing is unpickled: the architecture is a :class:`surgery.io.Architecture`.

Writing is atomic (:mod:`surgery.io._atomic`): everything goes into a temporary folder next to
the target, which is renamed into place at the end; a failure leaves no half-written folder.
Reading checks sizes and checksums first, so a truncated or corrupted file gives a
:class:`StorageError` naming it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.cut.apply import check_plan, slice_model
from surgery.cut.plan import PruningPlan, fingerprint
from surgery.errors import PlanError, StorageError
from surgery.io._atomic import atomic_folder
from surgery.io.architecture import Architecture

FORMAT = "surgery-pruned-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PLAN = "plan.json"
MANIFEST = "surgery.json"


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _base_fingerprint(arch: Architecture) -> str:
    """The fingerprint of the base model ``arch`` builds (on the meta device when possible)."""
    try:
        with torch.device("meta"):
            return fingerprint(arch.build())
    except StorageError:
        return fingerprint(arch.build())


def save(
    model: nn.Module,
    path: str | os.PathLike,
    plan: PruningPlan,
    architecture: "Architecture | str | nn.Module",
    *,
    overwrite: bool = False,
    check: bool = True,
    tokenizer: Any = None,
) -> Path:
    """Write the pruned ``model`` with its ``plan`` into the folder ``path``.

    ``architecture`` says how to rebuild the unpruned model: an :class:`Architecture`, the
    unpruned model itself, or a string (``"timm:vit_tiny_patch16_224"``,
    ``"torchvision:resnet18"``, ``"package.module:callable"``). With ``check`` the base
    architecture is built once (on the meta device) and must match the plan's fingerprint, so
    a folder that could not be loaded back is never written. ``tokenizer`` (anything with
    ``save_pretrained``, e.g. the model's Hugging Face tokenizer) is saved beside the weights.
    Returns ``path``.
    """
    path = Path(path)
    arch = Architecture.parse(architecture)
    if check:
        check_architecture(arch, plan)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        write_folder(model, tmp, plan, arch, tokenizer=tokenizer)
    return path


def check_architecture(arch: Architecture, plan: PruningPlan) -> None:
    """Refuse to save with an architecture that does not build the model ``plan`` was made
    for: such a folder could never be loaded back."""
    actual = _base_fingerprint(arch)
    if actual != plan.fingerprint:
        raise StorageError(
            f"the architecture {arch.source}:{arch.name} does not build the model this plan "
            f"was made for (fingerprint {actual}, plan {plan.fingerprint}); pass the unpruned "
            "model or its exact constructor arguments as architecture=."
        )


def write_folder(model: nn.Module, folder: Path, plan: PruningPlan, arch: Architecture, *,
                 tokenizer: Any = None) -> None:
    """The files of a saved pruned model, into the existing (temporary) ``folder``; callers
    that add files of their own (``surgery prune``'s report) write in the same folder before
    it is renamed into place (:func:`surgery.io._atomic.atomic_folder`)."""
    from safetensors.torch import save_model

    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / PLAN).write_text(plan.to_json())
    _write_hf_config(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": arch.to_dict(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "files": {name: {"bytes": (folder / name).stat().st_size,
                         "sha256": _sha256(folder / name)} for name in (WEIGHTS, PLAN)},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _write_hf_config(model: nn.Module, folder: Path) -> None:
    """Hugging Face models whose updated config describes them also get ``config.json``."""
    config = getattr(model, "config", None)
    if not (type(model).__module__.startswith("transformers.")
            and hasattr(config, "save_pretrained")):
        return
    if getattr(config, "surgery_layer_sizes", None) is not None:
        return
    config = copy.deepcopy(config)
    if hasattr(type(model), "__name__"):
        config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``surgery.json`` of a saved folder, validated."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise StorageError(f"{path} is not a folder written by surgery.io.save.")
    if not file.is_file():
        raise StorageError(f"{path} has no {MANIFEST}; it was not written by surgery.io.save "
                           "(or the save was interrupted).")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"{file} is not valid JSON ({exc}); the file is truncated or "
                           "corrupt.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StorageError(f"{file} is not a surgery manifest.")
    if manifest.get("version") != FORMAT_VERSION:
        raise StorageError(f"{file} has format version {manifest.get('version')!r}; this surgery "
                           f"reads version {FORMAT_VERSION}.")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise StorageError(f"{path / MANIFEST} lists no files; it is corrupt.")
    for name in (WEIGHTS, PLAN):
        record = files.get(name)
        file = path / name
        if not isinstance(record, dict):
            raise StorageError(f"{path / MANIFEST} has no record of {name}; it is corrupt.")
        if not file.is_file():
            raise StorageError(f"{file} is missing.")
        size = file.stat().st_size
        if size != record.get("bytes"):
            raise StorageError(f"{file} has {size} bytes, {record.get('bytes')} were written: "
                               "the file is truncated or was replaced.")
        if _sha256(file) != record.get("sha256"):
            raise StorageError(f"{file} does not match its checksum: the file is corrupt.")


def load_plan(path: str | os.PathLike) -> PruningPlan:
    """The plan of a saved folder (checked against its manifest)."""
    path = Path(path)
    _check_files(path, read_manifest(path))
    return _read_plan(path)


def _read_plan(path: Path) -> PruningPlan:
    try:
        return PruningPlan.from_json((path / PLAN).read_text())
    except (PlanError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StorageError(f"{path / PLAN} is not a valid pruning plan: {exc}") from exc


def _load_weights(model: nn.Module, file: Path, device: str | torch.device) -> None:
    """Load safetensors weights into ``model``, strictly.

    Unlike ``safetensors.torch.load_model`` this hands ``load_state_dict`` the rebuilt model's
    own state-dict metadata (each module's ``version``): modules that migrate old checkpoints
    in ``_load_from_state_dict`` (torchvision's MNASNet) refuse a state dict without it. A key
    missing from the file is fine only when it is a tied tensor ``save_model`` wrote once.
    """
    from safetensors.torch import load_file

    own = model.state_dict()
    weights = OrderedDict(load_file(str(file), device=str(device)))
    weights._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    saved = {own[k].data_ptr() for k in weights if k in own and own[k].numel()}
    missing = [k for k in missing if own[k].data_ptr() not in saved]
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the pruned model saved in ``path`` (in eval mode, on ``device``)."""
    from safetensors import SafetensorError

    path = Path(path)
    manifest = read_manifest(path)
    _check_files(path, manifest)
    plan = _read_plan(path)
    arch = Architecture.from_dict(manifest.get("architecture") or {})
    model = arch.build()
    try:
        check_plan(model, plan)
    except PlanError as exc:
        raise StorageError(
            f"the rebuilt {arch.source}:{arch.name} does not match the saved plan ({exc}); the "
            "installed library version may build a different architecture."
        ) from exc
    slice_model(model, plan)
    model.to(device)
    try:
        _load_weights(model, path / WEIGHTS, device)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise StorageError(f"cannot load the weights in {path / WEIGHTS} into the rebuilt "
                           f"model: {exc}") from exc
    model.eval()
    return model


__all__ = ["save", "load", "load_plan", "read_manifest"]
