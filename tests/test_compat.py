"""Old import paths keep working after the move to one package per stage: third-party
plugins import rule helpers from ``surgery.propagate``, and folders written by ``surgery
prune`` before the move name ``surgery.loading:factory_model`` as their architecture."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import surgery
from surgery._core.moved import MOVED
from surgery.graph.propagate import Propagation


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_module_path_warns_and_forwards(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    for target in MOVED[old]:
        new = importlib.import_module(target)
        public = getattr(new, "__all__", None) or [n for n in vars(new) if not n.startswith("_")]
        for name in public[:5]:
            assert getattr(module, name) is getattr(new, name)


def test_old_names_are_the_same_objects() -> None:
    sys.modules.pop("surgery.propagate", None)
    with pytest.warns(DeprecationWarning):
        from surgery.propagate import Propagation as Old
    assert Old is Propagation
    with pytest.raises(AttributeError, match="moved to surgery.graph.propagate"):
        importlib.import_module("surgery.propagate").no_such_name


def test_a_saved_folders_old_factory_path_resolves() -> None:
    from surgery.cli.folders import factory_model

    sys.modules.pop("surgery.loading", None)
    with pytest.warns(DeprecationWarning):
        assert pkgutil.resolve_name("surgery.loading:factory_model") is factory_model


def test_surgery_groups_is_the_function() -> None:
    assert callable(surgery.groups) and not isinstance(surgery.groups, type(surgery))
