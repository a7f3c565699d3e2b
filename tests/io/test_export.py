"""ONNX export of a pruned ResNet: onnxruntime computes what PyTorch computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import surgery  # noqa: E402
from surgery.io.onnx import ExportError, check_onnx, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def pruned_resnet():
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    for m in dense.modules():  # non-trivial BatchNorm statistics, so BN folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    pruned, plan = surgery.prune(dense, x, None, sparsity=0.5, criterion="magnitude")
    yield dense, pruned, x


def _conv_out_channels(path: Path) -> int:
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in init:
            total += init[node.input[1]].dims[0]
    return total


@pytest.fixture(scope="module")
def exported(pruned_resnet, tmp_path_factory):
    _, pruned, x = pruned_resnet
    path = tmp_path_factory.mktemp("onnx") / "resnet.onnx"
    return export_onnx(pruned, x, path, check_inputs=torch.randn(5, 3, 32, 32))


def test_pruned_resnet_onnx_matches_pytorch(pruned_resnet, exported) -> None:
    dense, pruned, x = pruned_resnet
    assert exported.max_abs_diff < 1e-4 and exported.dynamic_batch and exported.path.exists()
    # independently: fresh inputs of another batch size, straight through onnxruntime
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 32, 32)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x3.numpy()})[0])
    with torch.no_grad():
        want = pruned(x3)
    assert got.shape == (3, 10)
    assert (got - want).abs().max().item() < 1e-4
    # the file holds the pruned network, not the dense one
    def channels(model):
        return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    dense_channels, pruned_channels = channels(dense), channels(pruned)
    assert pruned_channels < dense_channels
    assert _conv_out_channels(exported.path) == pruned_channels


def test_check_catches_a_model_that_differs(pruned_resnet, exported) -> None:
    _, pruned, x = pruned_resnet
    assert check_onnx(exported.path, pruned, x)[0] < 1e-4
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    with pytest.raises(ExportError, match="disagrees with PyTorch: max abs diff"):
        check_onnx(exported.path, other, x)


def test_failed_check_leaves_no_file(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "out" / "tiny.onnx"
    with pytest.raises(ExportError):
        export_onnx(model, torch.randn(2, 4), path, atol=-1.0)  # no result passes atol < 0
    assert list(path.parent.iterdir()) == []
    assert export_onnx(model, torch.randn(2, 4), path).max_abs_diff < 1e-5
    assert [p.name for p in path.parent.iterdir()] == ["tiny.onnx"]
