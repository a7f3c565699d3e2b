"""The plugin host: one pluggy ``PluginManager`` with the built-ins and the entry points.

Built-in plugins are registered through the same hooks third parties use. Set
``SURGERY_PLUGINS`` to a comma-separated list of plugin names to load only those third-party
plugins (empty string: none); the built-ins always load.
"""

from __future__ import annotations

import functools
import importlib
import os

import pluggy

from surgery import hookspecs

ENTRY_POINT_GROUP = "surgery"
BUILTIN_PLUGINS = ("surgery.rules", "surgery_plugins.cnn")


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, created on first use."""
    pm = pluggy.PluginManager("surgery")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    allowed = os.environ.get("SURGERY_PLUGINS")
    if allowed is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    else:
        wanted = {n.strip() for n in allowed.split(",") if n.strip()}
        for name in wanted:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    return pm


def merged(results: list[dict]) -> dict:
    """Merge dict-returning hook results; later registrations (third parties) win."""
    out: dict = {}
    for r in reversed(results):
        out.update(r or {})
    return out
