"""Distributed calibration: 2 CPU processes (gloo, loopback) derive the single-process plan."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torchvision

import surgery
from surgery.cut.plan import PruningPlan

SETUP = """
import torch, torchvision
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g))
           for _ in range(6)]
example = batches[0][0][:2]
"""

WORKER = SETUP + """
import sys
import surgery
from surgery.stats import distributed
assert distributed.init_from_env()
_, plan = surgery.prune(model, example, batches, sparsity=0.5, target="labels")
if distributed.rank() == 0:
    plan.save(sys.argv[1])
"""


def test_two_gloo_processes_give_the_single_process_plan(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed_plan = PruningPlan.load(out)

    scope: dict = {}
    exec(textwrap.dedent(SETUP), scope)
    _, single = surgery.prune(scope["model"], scope["example"], scope["batches"], sparsity=0.5,
                              target="labels")
    # Kept sets are identical; scores agree to 1e-6 relative (float64 round-off: the sums are added in a
    # different order: per rank, then across ranks).
    assert [g.kept for g in distributed_plan.groups] == [g.kept for g in single.groups]
    assert distributed_plan.keep == single.keep
    for a, b in zip(distributed_plan.groups, single.groups):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-9)


def test_distributed_flag_without_a_process_group_is_single_process() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    a = surgery.make_plan(model, x[:2], [x], sparsity=0.3, distributed=None)
    b = surgery.make_plan(model, x[:2], [x], sparsity=0.3, distributed=False)
    assert json.loads(a.to_json()) == json.loads(b.to_json())
