"""How to rebuild the unpruned model a plan was made for, without pickle.

An :class:`Architecture` is one of ``transformers`` (a model class plus its config),
``timm`` (a model name plus keyword arguments), ``torchvision`` (a builder name plus keyword
arguments) or ``factory`` (an import string ``package.module:callable`` plus keyword
arguments; the callable is imported and called: only load folders you trust).
"""

from __future__ import annotations

import copy
import json
import pkgutil
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch.nn as nn

from surgery.errors import StorageError

BUILDERS: dict[str, Callable[["Architecture"], nn.Module]] = {}
"""How each source builds its models, filled by :func:`builder` below."""


def builder(source: str) -> Callable[[Callable], Callable]:
    """Decorator: the function that builds an :class:`Architecture` of ``source``."""

    def add(build: Callable[["Architecture"], nn.Module]) -> Callable:
        BUILDERS[source] = build
        return build

    return add


@dataclass
class Architecture:
    """How to build the unpruned model a plan was made for (see the module docstring)."""

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.source not in BUILDERS:
            raise StorageError(f"architecture source must be one of {sorted(BUILDERS)}, got "
                               f"{self.source!r}.")
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
            return BUILDERS[self.source](self)
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


@builder("transformers")
def _transformers(arch: Architecture) -> nn.Module:
    import transformers

    model_cls = getattr(transformers, arch.name)
    return model_cls(model_cls.config_class.from_dict(copy.deepcopy(arch.config or {})))


@builder("timm")
def _timm(arch: Architecture) -> nn.Module:
    import timm

    return timm.create_model(arch.name, pretrained=False, **arch.kwargs)


@builder("torchvision")
def _torchvision(arch: Architecture) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch.name, weights=None, **arch.kwargs)


@builder("factory")
def _factory(arch: Architecture) -> nn.Module:
    return pkgutil.resolve_name(arch.name)(**arch.kwargs)
