"""The example third-party plugin (examples/surgery-plugin-example), installed and discovered
through its ``surgery`` entry point exactly as a user's plugin would be.

The plugin teaches the engine ``ScaledLinear``; these tests check that it is found under its
entry-point name, that with it the ScaledLinear groups are prunable and really cut, and that
with third-party plugins switched off (``SURGERY_PLUGINS=""``) those channels are frozen as an
unsupported op, so the plugin changes what gets pruned. docs/plugin-guide.md walks through it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import surgery
from surgery.plugins import plugin_manager

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "surgery-plugin-example"


def _entry_point_listed() -> bool:
    return any(ep.name == "example" for ep in importlib.metadata.entry_points(group="surgery"))


@pytest.fixture(scope="session")
def example_plugin():
    """Install the example package (editable, no deps) unless its entry point is already
    there (``make test`` installs it), then import it; the manager is rebuilt around it."""
    if not _entry_point_listed():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "-e", str(EXAMPLE_DIR)],
            check=True,
        )
        importlib.invalidate_caches()
    assert _entry_point_listed(), "pip install did not register the 'example' entry point"
    try:
        module = importlib.import_module("surgery_example_plugin")
    except ImportError:  # an editable install's .pth is only read at interpreter start:
        site.addsitedir(sysconfig.get_paths()["purelib"])  # read it now, as site does
        module = importlib.import_module("surgery_example_plugin")
    plugin_manager.cache_clear()
    yield module
    plugin_manager.cache_clear()


@pytest.fixture
def manager(example_plugin, monkeypatch):
    """A fresh manager for each test (its environment may differ); reset again afterwards."""
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)
    plugin_manager.cache_clear()
    yield monkeypatch
    plugin_manager.cache_clear()


def _model(plugin):
    torch.manual_seed(0)
    model = plugin.GatedBlockNet().eval()
    x = torch.randn(16, 16)
    calib = [torch.randn(32, 16) for _ in range(4)]
    return model, x, calib


def test_discovered_through_its_entry_point(example_plugin, manager) -> None:
    names = dict((name, plugin) for name, plugin in plugin_manager().list_name_plugin())
    assert names.get("example") is example_plugin
    hook = plugin_manager().hook.surgery_module_rules
    impls = {impl.plugin_name for impl in hook.get_hookimpls()}
    assert "example" in impls


def test_plugin_makes_scaled_linear_prunable(example_plugin, manager) -> None:
    model, x, _ = _model(example_plugin)
    by_name = {g.name.split(" ")[0]: g for g in surgery.groups(model, x)}
    for name in ("stem", "up", "down"):
        assert by_name[name].prunable, (name, by_name[name].reason)
    # up and gate are one group: the product joins their outputs; scale/bias go with the rows
    assert {("up.scale", 0), ("gate.scale", 0), ("down.weight", 1)} <= set(by_name["up"].slices)
    assert not by_name["head"].prunable and by_name["head"].reason == "frozen module head"


def test_plugin_prune_cuts_scaled_linear(example_plugin, manager) -> None:
    model, x, calib = _model(example_plugin)
    dense_macs = surgery.count_macs(model, x)
    pruned, plan = surgery.prune(model, x, calib, sparsity=0.5)  # MI scoring, MAC budget
    assert pruned(x).shape == model(x).shape
    assert surgery.count_params(pruned) < surgery.count_params(model)
    assert abs(1 - surgery.count_macs(pruned, x) / dense_macs - 0.5) <= 0.05
    assert pruned.up.out_features < model.up.out_features
    assert pruned.down.out_features < model.down.out_features
    assert pruned.head.out_features == model.head.out_features  # frozen by the plugin
    for m in pruned.modules():  # surgery_fix_module kept the width attributes honest
        if isinstance(m, example_plugin.ScaledLinear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)
            assert m.scale.shape == m.bias.shape == (m.out_features,)
    assert pruned.down.in_features == pruned.up.out_features == pruned.gate.out_features


def test_keep_everything_is_the_identity(example_plugin, manager) -> None:
    model, x, _ = _model(example_plugin)
    same, _ = surgery.prune(model, x, sparsity=0.0, criterion="magnitude", compensate=False)
    torch.testing.assert_close(same(x), model(x))


def test_without_third_party_plugins_the_channels_are_frozen(example_plugin, manager) -> None:
    model, x, calib = _model(example_plugin)
    _, with_plugin = surgery.prune(model, x, calib, sparsity=0.2)

    manager.setenv("SURGERY_PLUGINS", "")  # built-ins only
    plugin_manager.cache_clear()
    assert "example" not in dict(plugin_manager().list_name_plugin())
    groups = {g.name.split(" ")[0]: g for g in surgery.groups(model, x)}
    assert not groups["stem"].prunable and "unsupported" in groups["stem"].reason
    assert not any(name in groups for name in ("up", "down", "head"))  # inside opaque addmm
    pruned, without = surgery.prune(model, x, calib, sparsity=0.1)
    assert pruned(x).shape == model(x).shape
    cut = {p.split(".")[0] for p in without.keep}
    assert cut == {"classifier"}
    assert {p.split(".")[0] for p in with_plugin.keep} >= {"stem", "up", "gate", "down",
                                                           "classifier"}
