"""Every hook in surgery/hookspecs.py is in the plugin guide with its real signature, and the
guide names no hook that does not exist: the docs cannot drift from the hooks."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from surgery import hookspecs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugin-guide.md"


def _specs() -> dict[str, str]:
    """``{hook: "name(arg, ...)"}`` for every function marked ``@hookspec``."""
    out = {}
    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "surgery_spec"):
            out[name] = f"{name}({', '.join(inspect.signature(fn).parameters)})"
    return out


def test_every_hook_is_documented_with_its_signature() -> None:
    guide = GUIDE.read_text()
    specs = _specs()
    assert len(specs) >= 10
    missing = [sig for sig in specs.values() if f"`{sig}`" not in guide]
    assert not missing, f"docs/plugin-guide.md lacks {missing}"


def test_the_guide_names_only_real_hooks() -> None:
    named = set(re.findall(r"`(surgery_\w+)\(", GUIDE.read_text()))
    assert named and named <= set(_specs()), named - set(_specs())
