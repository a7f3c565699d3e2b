"""Saving and reloading pruned models (``surgery.io``): round trips, HF ``save_pretrained`` /
``from_pretrained``, atomic writes, and clear errors on damaged folders."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torchvision

import surgery
from helpers.transformer_zoo import TIMM_KWARGS, inputs, logits, make
from surgery import io
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan
from surgery.errors import StorageError, SurgeryError
from surgery.graph.capture import trace
from surgery.graph.groups import find_groups

_CACHE: dict[str, tuple] = {}


def pruned(name: str, uniform: bool = True):
    """(dense model, inputs, plan, pruned model): half the heads and FFN units of every layer
    and half the hidden size (uniform), or different head counts per layer."""
    key = f"{name}-{uniform}"
    if key not in _CACHE:
        model = make(name)
        x = inputs(name, model)
        c = find_groups(trace(model, x))
        heads = [g for g in c.prunable if g.kind == "head"]
        kept = {g.id: list(range(g.atoms // 2)) for g in c.prunable}
        if not uniform:
            kept = {heads[0].id: [0, 2, 3], heads[1].id: [1]}
        plan = build_plan(c, kept, criterion="test", target="output", budget={})
        _CACHE[key] = (model, x, plan, apply_plan(model, plan, x))
    return _CACHE[key]


def same(a: torch.nn.Module, b: torch.nn.Module, x) -> bool:
    return torch.equal(logits(a, x), logits(b, x))


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "distilbert", "hf_vit"])
def test_hf_round_trip_and_from_pretrained(name, tmp_path):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if name == "hf_vit" else AutoModelForSequenceClassification
    dense, x, plan, small = pruned(name)
    folder = io.save(small, tmp_path / "saved", plan, dense)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "plan.json", "surgery.json"]
    assert same(io.load(folder), small, x)
    assert io.load_plan(folder).keep == plan.keep
    # the folder is also a Hugging Face checkpoint, and so is save_pretrained's
    assert same(auto.from_pretrained(folder).eval(), small, x)
    small.save_pretrained(tmp_path / "hf")
    assert same(auto.from_pretrained(tmp_path / "hf").eval(), small, x)


def test_non_uniform_heads_round_trip_through_surgery_only(tmp_path):
    from transformers import AutoModelForSequenceClassification

    dense, x, plan, small = pruned("bert", uniform=False)
    assert small.config.surgery_layer_sizes["num_attention_heads"] == [3, 1]
    folder = io.save(small, tmp_path / "saved", plan, io.Architecture.transformers(dense))
    assert "config.json" not in os.listdir(folder)  # BertConfig cannot describe it
    assert same(io.load(folder), small, x)
    small.save_pretrained(tmp_path / "hf")
    # loud, never silently re-initialised: the config holds the largest layer's head count
    # (3 heads of 16 in 64 dims), which BertConfig refuses, and any other would mismatch
    with pytest.raises(Exception, match="mismatch|not a multiple"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")


def test_timm_round_trip_needs_the_exact_constructor(tmp_path):
    dense, x, plan, small = pruned("timm_vit")
    with pytest.raises(StorageError, match="does not build the model this plan"):
        io.save(small, tmp_path / "a", plan, "timm:vit_tiny_patch16_224")
    assert not (tmp_path / "a").exists()
    arch = io.Architecture.timm("vit_tiny_patch16_224", **TIMM_KWARGS)
    folder = io.save(small, tmp_path / "b", plan, arch)
    assert json.loads((folder / "surgery.json").read_text())["architecture"]["source"] == "timm"
    assert same(io.load(folder), small, x)


def test_torchvision_and_factory_architectures(tmp_path):
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    c = find_groups(trace(dense, x))
    plan = build_plan(c, {g.id: list(range(g.atoms // 2)) for g in c.prunable},
                      criterion="test", target="output", budget={})
    small = apply_plan(dense, plan, x)
    a = io.save(small, tmp_path / "tv", plan, io.Architecture.torchvision("resnet18", num_classes=10))
    b = io.save(small, tmp_path / "fn", plan,
                io.Architecture.factory("torchvision.models:resnet18", num_classes=10))
    for folder in (a, b):
        assert same(io.load(folder), small, x)


def test_reload_keeps_module_versions(tmp_path):
    """torchvision's MNASNet checks each block's state-dict ``version`` while loading; the
    rebuilt model's own metadata must reach ``load_state_dict`` (the sweep found this)."""
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.mnasnet0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    c = find_groups(trace(dense, x))
    plan = build_plan(c, {g.id: list(range(0, g.atoms, 2)) for g in c.prunable},
                      criterion="test", target="output", budget={})
    small = apply_plan(dense, plan, x)
    folder = io.save(small, tmp_path / "m", plan, io.Architecture.torchvision("mnasnet0_5", num_classes=10))
    assert same(io.load(folder), small, x)


# ---------------------------------------------------------------------------------------
# Atomic writes and damaged folders
# ---------------------------------------------------------------------------------------


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    dense, _, plan, small = pruned("bert")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save(small, tmp_path / "saved", plan, dense)
    assert os.listdir(tmp_path) == []


def test_existing_folder_is_kept_unless_overwrite(tmp_path):
    dense, x, plan, small = pruned("bert")
    target = tmp_path / "saved"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="already exists"):
        io.save(small, target, plan, dense)
    assert os.listdir(target) == ["keep.txt"]
    io.save(small, target, plan, dense, overwrite=True)
    assert "keep.txt" not in os.listdir(target) and same(io.load(target), small, x)
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary folders left behind


@pytest.fixture
def saved(tmp_path):
    dense, _, plan, small = pruned("bert")
    return io.save(small, tmp_path / "saved", plan, dense)


def test_truncated_weights(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(StorageError, match="model.safetensors.*truncated"):
        io.load(saved)


def test_corrupted_weights(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="checksum"):
        io.load(saved)


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_ours"])
def test_damaged_manifest(saved, damage):
    manifest = saved / "surgery.json"
    if damage == "missing":
        manifest.unlink()
    elif damage == "truncated":
        manifest.write_text(manifest.read_text()[:40])
    else:
        manifest.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StorageError, match="surgery"):
        io.load(saved)


def test_plan_edited_after_saving(saved):
    plan = saved / "plan.json"
    plan.write_text(plan.read_text().replace('"criterion": "test"', '"criterion": "TEST"'))
    with pytest.raises(StorageError, match="plan.json"):
        io.load(saved)


def test_errors_are_surgery_errors():
    assert issubclass(StorageError, SurgeryError)
    with pytest.raises(SurgeryError, match="not a folder"):
        io.load("/nonexistent/surgery/folder")


def test_saved_files_get_the_permissions_the_umask_gives(tmp_path: Path) -> None:
    """io.save and 'surgery prune' write through one atomic writer, so a folder and its files
    get what a plain mkdir/open would give them (a temporary folder is 0700 otherwise)."""
    dense = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, plan = surgery.prune(dense, x, sparsity=0.3, criterion="magnitude")
    old = os.umask(0o027)
    try:
        folder = io.save(pruned, tmp_path / "m", plan, io.Architecture.torchvision(
            "resnet18", num_classes=10))
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o640}
