"""The plugin host: one pluggy ``PluginManager`` with the built-ins and the entry points.

Built-in plugins are registered through the same hooks third parties use. Set
``SURGERY_PLUGINS`` to a comma-separated list of plugin names to load only those third-party
plugins (empty string: none); the built-ins always load.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
from typing import Any

import pluggy

from surgery import hookspecs
from surgery.errors import PluginError, SurgeryError

ENTRY_POINT_GROUP = "surgery"
BUILTIN_PLUGINS = ("surgery.graph.rules", "surgery_plugins.timm_cnn",
                   "surgery_plugins.hf_encoders", "surgery_plugins.vision_transformers",
                   "surgery_plugins.decoder_llms")


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


def call_hook(hook_name: str, /, **kwargs: Any) -> Any:
    """Call hook ``hook_name`` with keyword arguments on every registered plugin.

    An exception raised inside a plugin becomes a :class:`PluginError` naming the plugin and the
    hook (the original is chained); a :class:`SurgeryError` a plugin raises on purpose passes
    through unchanged."""
    hook = getattr(plugin_manager().hook, hook_name)
    try:
        return hook(**kwargs)
    except SurgeryError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {_culprit(hook, exc)} raised {type(exc).__name__} in hook {hook_name}: {exc}. "
            "Fix the plugin, or leave it out: plugin_manager().unregister(...) for one registered "
            "in code, SURGERY_PLUGINS=<names to keep> for entry-point plugins."
        ) from exc


def plugin_label(plugin: Any, name: str | None = None) -> str:
    """A readable name for a registered plugin object (module, class or instance)."""
    if isinstance(plugin, types.ModuleType):
        what = plugin.__name__
    elif isinstance(plugin, type):
        what = f"{plugin.__module__}.{plugin.__qualname__}"
    else:
        what = f"{type(plugin).__module__}.{type(plugin).__qualname__} object"
    if name is None or name == what or name == str(id(plugin)):
        return repr(what)
    return f"{name!r} ({what})"


def _culprit(hook: Any, exc: BaseException) -> str:
    """The plugin whose implementation of ``hook`` raised ``exc``, found by matching the
    traceback's frames with the implementations' code objects."""
    impls = hook.get_hookimpls()
    codes = {}
    for impl in impls:
        fn = getattr(impl.function, "__func__", impl.function)
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.setdefault(code, impl)
    tb = exc.__traceback__
    while tb is not None:
        impl = codes.get(tb.tb_frame.f_code)
        if impl is not None:
            return plugin_label(impl.plugin, impl.plugin_name)
        tb = tb.tb_next
    names = ", ".join(plugin_label(i.plugin, i.plugin_name) for i in impls)
    return f"(one of {names})"
