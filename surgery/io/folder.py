"""Saving and reloading pruned models: safetensors weights, the plan, the base architecture.

A saved pruned model is a folder::

    model.safetensors   the pruned weights (safetensors; shared tensors stored once)
    plan.json           the PruningPlan that made it (what every parameter kept)
    surgery.json        format version, how to rebuild the *unpruned* architecture, and the
                        size and sha256 of the two files above
    config.json         Hugging Face models only, when the updated config describes the pruned
                        model: the folder then also loads with ``from_pretrained``

:func:`load` rebuilds the unpruned architecture (no weights needed), slices it with the plan
(:func:`surgery.apply.slice_model`, no tracing, the same fix-ups as pruning) and loads the
weights. Nothing is unpickled: the architecture is one of

* ``transformers``: a model class exported by ``transformers`` plus its base ``config.to_dict()``;
* ``timm``: a model name plus JSON keyword arguments for ``timm.create_model``;
* ``torchvision``: a builder name plus keyword arguments for ``torchvision.models.get_model``;
* ``factory``: an import string ``"package.module:callable"`` plus keyword arguments, for
  anything else (the callable is imported and called: only load folders you trust).

Writing is atomic: everything goes into a temporary folder next to the target, which is
renamed into place at the end; a failure leaves no half-written folder. Reading checks sizes
and checksums first, so a truncated or corrupted file gives a :class:`StorageError` naming it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.cut.apply import check_plan, slice_model
from surgery.errors import PlanError, StorageError
from surgery.cut.plan import PruningPlan, fingerprint

FORMAT = "surgery-pruned-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PLAN = "plan.json"
MANIFEST = "surgery.json"
SOURCES = ("transformers", "timm", "torchvision", "factory")


@dataclass
class Architecture:
    """How to build the unpruned model a plan was made for (see the module docstring)."""

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise StorageError(f"architecture source must be one of {SOURCES}, got {self.source!r}.")
        try:
            json.dumps({"kwargs": self.kwargs, "config": self.config})
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"the architecture's keyword arguments must be JSON values ({exc}); pass plain "
                "numbers, strings, lists and dicts."
            ) from exc

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def transformers(cls, model_or_config: Any, model_class: str | type | None = None
                     ) -> "Architecture":
        """From an *unpruned* Hugging Face model (or its config plus ``model_class``)."""
        if isinstance(model_or_config, nn.Module):
            config = model_or_config.config
            model_class = model_class or type(model_or_config)
        else:
            config = model_or_config
        if model_class is None:
            raise StorageError("Architecture.transformers(config) needs model_class=, e.g. "
                               "'BertForSequenceClassification'.")
        name = model_class if isinstance(model_class, str) else model_class.__name__
        data = config.to_dict()
        data.pop("surgery_layer_sizes", None)
        return cls("transformers", name, config=data)

    @classmethod
    def timm(cls, name: str, **kwargs: Any) -> "Architecture":
        """``timm.create_model(name, pretrained=False, **kwargs)``."""
        return cls("timm", name, dict(kwargs))

    @classmethod
    def torchvision(cls, name: str, **kwargs: Any) -> "Architecture":
        """``torchvision.models.get_model(name, weights=None, **kwargs)``."""
        return cls("torchvision", name, dict(kwargs))

    @classmethod
    def factory(cls, target: str, **kwargs: Any) -> "Architecture":
        """``package.module:callable`` called with ``kwargs``."""
        if ":" not in target:
            raise StorageError(f"a factory is written 'package.module:callable', got {target!r}.")
        return cls("factory", target, dict(kwargs))

    @classmethod
    def parse(cls, spec: "str | Architecture | nn.Module") -> "Architecture":
        """An Architecture from itself, a dense (unpruned) model, or a string
        ``"timm:NAME"``, ``"torchvision:NAME"`` or ``"package.module:callable"``."""
        if isinstance(spec, Architecture):
            return spec
        if isinstance(spec, nn.Module):
            return architecture_of(spec)
        if isinstance(spec, str):
            head, _, rest = spec.partition(":")
            if head in ("timm", "torchvision") and rest:
                return cls(head, rest)
            return cls.factory(spec)
        raise StorageError(f"cannot describe an architecture with {type(spec).__name__}; pass an "
                           "Architecture, the unpruned model, or a 'module:callable' string.")

    # ---- building -----------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """Build the unpruned model with fresh weights."""
        try:
            if self.source == "transformers":
                import transformers

                model_cls = getattr(transformers, self.name)
                config = model_cls.config_class.from_dict(copy.deepcopy(self.config or {}))
                return model_cls(config)
            if self.source == "timm":
                import timm

                return timm.create_model(self.name, pretrained=False, **self.kwargs)
            if self.source == "torchvision":
                import torchvision

                return torchvision.models.get_model(self.name, weights=None, **self.kwargs)
            module_name, _, attr = self.name.partition(":")
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
            return target(**self.kwargs)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(
                f"cannot build the base architecture {self.source}:{self.name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        try:
            return cls(d["source"], d["name"], dict(d.get("kwargs") or {}), d.get("config"))
        except (KeyError, TypeError) as exc:
            raise StorageError(f"malformed architecture record ({exc}).") from exc


def architecture_of(model: nn.Module) -> Architecture:
    """Describe an unpruned model: Hugging Face models by class and config, timm models by the
    name they were created with (keyword arguments beyond the defaults are not recoverable:
    pass ``Architecture.timm(name, **kwargs)`` for those)."""
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and hasattr(config, "to_dict"):
        return Architecture.transformers(model)
    pretrained = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(pretrained, dict) \
            and pretrained.get("architecture"):
        kwargs: dict[str, Any] = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img is not None:
            kwargs["img_size"] = list(img) if isinstance(img, (tuple, list)) else img
        return Architecture.timm(pretrained["architecture"], **kwargs)
    raise StorageError(
        f"cannot tell how to rebuild a {type(model).__name__}; pass architecture= as "
        "Architecture.torchvision('resnet18'), Architecture.timm(name, **kwargs) or "
        "Architecture.factory('package.module:callable', **kwargs)."
    )


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
) -> Path:
    """Write the pruned ``model`` with its ``plan`` into the folder ``path``.

    ``architecture`` says how to rebuild the unpruned model: an :class:`Architecture`, the
    unpruned model itself, or a string (``"timm:vit_tiny_patch16_224"``,
    ``"torchvision:resnet18"``, ``"package.module:callable"``). With ``check`` the base
    architecture is built once (on the meta device) and must match the plan's fingerprint, so
    a folder that could not be loaded back is never written. Returns ``path``.
    """
    from safetensors.torch import save_model

    path = Path(path)
    arch = Architecture.parse(architecture)
    if check:
        actual = _base_fingerprint(arch)
        if actual != plan.fingerprint:
            raise StorageError(
                f"the architecture {arch.source}:{arch.name} does not build the model this plan "
                f"was made for (fingerprint {actual}, plan {plan.fingerprint}); pass the unpruned "
                "model or its exact constructor arguments as architecture=."
            )
    if path.exists() and not overwrite:
        raise StorageError(f"{path} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / PLAN).write_text(plan.to_json())
        _write_hf_config(model, tmp)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "architecture": arch.to_dict(),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                      for name in (WEIGHTS, PLAN)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed only
    once the new folder is in place."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_hf_config(model: nn.Module, folder: Path) -> None:
    """Hugging Face models whose updated config describes them also get ``config.json``."""
    config = getattr(model, "config", None)
    if not (type(model).__module__.startswith("transformers.") and hasattr(config, "save_pretrained")):
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


__all__ = ["Architecture", "architecture_of", "save", "load", "load_plan", "read_manifest"]
