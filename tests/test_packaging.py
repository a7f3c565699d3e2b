"""The distribution holds every subpackage and every module imports from it.

pyproject finds packages instead of listing them, and this builds the wheel to prove it: a new
subpackage that the wheel left out would otherwise pass every other test (they run from the
source tree) and fail only for users.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import surgery
import surgery_plugins

ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> list[str]:
    names = []
    for package in (surgery, surgery_plugins):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def test_the_wheel_holds_every_module_and_they_import_from_it(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("model_surgery-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    in_wheel = sorted(
        ".".join(p.relative_to(unpacked).with_suffix("").parts).removesuffix(".__init__")
        for p in unpacked.rglob("*.py"))
    assert in_wheel == _source_modules()
    code = ("import importlib, sys, surgery; "
            f"assert surgery.__file__.startswith({str(unpacked)!r}), surgery.__file__; "
            "[importlib.import_module(m) for m in sys.argv[1:]]")
    done = subprocess.run([sys.executable, "-c", code, *in_wheel], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_package_attribute_hides_a_submodule() -> None:
    """``from surgery.stats import calibration`` must give the module: a function or class
    exported under a submodule's name would hide it (as ``surgery.groups`` once did)."""
    for name in _source_modules():
        parent, _, child = name.rpartition(".")
        if not parent or name in ("surgery.groups",):
            continue
        module = importlib.import_module(name)
        assert getattr(importlib.import_module(parent), child) is module, name
