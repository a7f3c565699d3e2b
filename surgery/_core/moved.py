"""Old import paths, kept working: modules that moved when surgery/ became one package per
pipeline stage.

Third-party plugins import channel-rule helpers from ``surgery.propagate`` and
``surgery.rules``, and folders written by ``surgery prune`` before the move name
``surgery.loading:factory_model`` as their architecture. A meta-path finder answers those old
names with a thin alias module: attribute lookups go to the new modules (the same objects, so
``isinstance`` and identity hold) and importing it warns once with a ``DeprecationWarning``
naming the new place. One table, no stub files.

``surgery.groups`` is not aliased: it is the public function ``surgery.groups(model, x)``, and
a submodule of that name would replace it on the package (the clash the move removed); the
module is :mod:`surgery.graph.groups`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    # old module: new modules, searched in order for each attribute
    "surgery.inputs": ("surgery._core.batches",),
    "surgery.modes": ("surgery._core.modes",),
    "surgery.capture": ("surgery.graph.capture",),
    "surgery.propagate": ("surgery.graph.propagate",),
    "surgery.rules": ("surgery.graph.rules", "surgery.graph.rules.tracks",
                      "surgery.graph.rules.shapes", "surgery.graph.rules.layers",
                      "surgery.graph.rules.attention"),
    "surgery.calibration": ("surgery.stats.calibration", "surgery.stats.moments",
                            "surgery.stats._probes", "surgery._core.batches",
                            "surgery._core.memory"),
    "surgery.distributed": ("surgery.stats.distributed",),
    "surgery.criteria": ("surgery.scoring.criteria", "surgery.scoring.mi"),
    "surgery.estimators": ("surgery.scoring.estimators",),
    "surgery.selection": ("surgery.scoring.selection",),
    "surgery.allocation": ("surgery.budget.kind_search",),
    "surgery.plan": ("surgery.cut.plan",),
    "surgery.apply": ("surgery.cut.apply",),
    "surgery.compensation": ("surgery.cut.compensation",),
    "surgery.recovery": ("surgery.cut.recovery",),
    "surgery.export": ("surgery.io.onnx",),
    "surgery.loading": ("surgery.cli.specs", "surgery.cli.data", "surgery.cli.folders",
                        "surgery.io.checkpoint", "surgery.errors"),
    "surgery.report": ("surgery.cli.report",),
    "surgery.datasets": ("surgery.demo.datasets",),
    "surgery_plugins.bert": ("surgery_plugins.hf_encoders",),
    "surgery_plugins.vit": ("surgery_plugins.vision_transformers",),
    "surgery_plugins.cnn": ("surgery_plugins.timm_cnn",),
    "surgery_plugins.attention": ("surgery.graph.rules.leaves",
                                  "surgery_plugins.transformers_common"),
}


class _Alias(types.ModuleType):
    """A module whose attributes are those of the modules it stands for."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved: see {', '.join(targets)}.")
        self.__targets = targets

    def __getattr__(self, attr: str) -> Any:
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self.__targets)}) "
                             f"has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({a for t in self.__targets for a in dir(importlib.import_module(t))})


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Alias(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        targets = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {' / '.join(targets)}; the old path will be "
                      "removed in a future release.", DeprecationWarning, stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
