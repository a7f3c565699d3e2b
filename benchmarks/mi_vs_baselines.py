"""MI pruning side by side with the structural and weight-based pruners users would pick.

For one model and several sizes (share of parameters removed), in one run: ours (`mi`: joint
MI selection, with the plugin's kind weights and with kinds alike, `mi_topk`: the paper's
independent top-k, `act_weight`, `taylor`, `magnitude`; all with least-squares compensation
and BatchNorm re-estimation) against Torch-Pruning 1.6 (group L2 magnitude, group Taylor,
random; followed by the same BatchNorm re-estimation), unstructured global L1 magnitude, and
movement pruning (unstructured, hard top-k with the straight-through estimator, with its own
training: ``--movement-epochs`` passes over the train split). Accuracy with no retraining and
after the same short distillation recovery for every other method, parameters, CPU latency
(batch 32) and pruning time; a table and an accuracy-vs-size plot in docs/benchmarks/.

Models (see ../shared/assets.md for the data):
- ``cnn``: a ResNet-18 trained on Fashion-MNIST (the demo's, cached);
- ``vit``: a small timm ViT trained on Fashion-MNIST (cached; Torch-Pruning gets its heads
  declared as in its timm example);
- ``minilm``: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (the demo's, cached); sizes are
  shares of the encoder's parameters; Torch-Pruning cuts channels, heads' dims and the
  hidden size (heads declared as in its BERT example).

Usage: ``python benchmarks/mi_vs_baselines.py --model cnn|vit|minilm [--sizes 0.3,0.5,0.75]
[--recovery-steps 100] [--methods SUBSTRINGS] [--round-to 16]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from _common import DOCS, machine, markdown_table, write_result


@dataclass
class Task:
    """A trained model with its data and how to score it."""

    name: str
    title: str
    model: torch.nn.Module
    example: Any
    calib: list[Any]
    train: list[Any]
    test: list[Any]
    """Labelled test batches, the same for every row."""
    latency_input: Any
    scope: Callable[[torch.nn.Module], int]
    ignored: Callable[[torch.nn.Module], list[torch.nn.Module]]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    budget_scope: str = ""
    several_kinds: bool = False  # heads, neurons, hidden dims: compare per-kind rates
    recovery_lr: float = 1e-4  # the fine-tune's own rate where the task has one
    output: Callable[[Any], torch.Tensor] = lambda out: out
    movement_train: list[Any] | None = None
    """Movement pruning's own training data, when the task's train split is bigger than the
    recovery's slice (Fashion-MNIST: the whole 60,000-image split but the calibration images)."""

    def evaluate(self, model: torch.nn.Module) -> float:
        """Top-1 accuracy on the test batches."""
        from surgery.counting import accuracy

        return accuracy(model, self.test)[0]

    @property
    def test_size(self) -> int:
        """Test examples every accuracy is measured on (its standard error is binomial)."""
        from surgery._core.batches import split_batch

        return sum(len(split_batch(b)[1]) for b in self.test)


TEST_IMAGES = 2000
"""Fashion-MNIST test images every accuracy is measured on (``--test-images``; 0: all
10,000, which halves the standard error)."""


def cnn_task() -> Task:
    from surgery import demo as job

    return _fashion_task("cnn", "ResNet-18 trained on Fashion-MNIST (32x32)",
                         job.resnet18_fashion, lambda m: [m.fc])


def vit_task() -> Task:
    from surgery import demo as job

    task = _fashion_task("vit", "timm ViT (width 192, 6 blocks, 4x4 patches) trained on "
                         "Fashion-MNIST (32x32)", job.vit_fashion, lambda m: [m.head])
    task.several_kinds = True
    return task


def _fashion_task(name: str, title: str, make: Callable[[], torch.nn.Module],
                  ignored: Callable[[torch.nn.Module], list]) -> Task:
    from surgery import demo as job
    from surgery.demo.datasets import fashion_mnist
    from surgery.errors import AssetMissing

    try:
        tx, ty = fashion_mnist("train")
        vx, vy = fashion_mnist("test")
    except AssetMissing as exc:
        sys.exit(str(exc))
    model = make()
    cx, cy = job.prepare(tx[-512:]), ty[-512:]
    rx, ry = job.prepare(tx[-4096:-512]), ty[-4096:-512]
    mx, my = tx[:-512], ty[:-512]
    vx, vy = job.prepare(vx[:TEST_IMAGES or None]), vy[:TEST_IMAGES or None]
    tests = [(vx[i:i + 256], vy[i:i + 256]) for i in range(0, len(vx), 256)]
    return Task(
        name=name, title=title, model=model,
        example=vx[:2], calib=[(cx[i:i + 64], cy[i:i + 64]) for i in range(0, 512, 64)],
        train=[(rx[i:i + 64], ry[i:i + 64]) for i in range(0, len(rx), 64)],
        test=tests, latency_input=vx[:32],
        scope=lambda m: sum(p.numel() for p in m.parameters()),
        ignored=ignored,
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        movement_train=[(job.prepare(mx[i:i + 64]), my[i:i + 64])
                        for i in range(0, len(mx), 64)],
    )


def minilm_task() -> Task:
    from surgery.demo import minilm_rotten_tomatoes
    from surgery.errors import AssetMissing

    try:
        task = minilm_rotten_tomatoes()
    except AssetMissing as exc:
        sys.exit(str(exc))
    model = task.model
    batches = task.batches("train", 32)
    calib, train = batches[:16], batches[16:]  # 512 snippets to calibrate, the rest to recover
    test = task.batches("test")
    scope = "bert.encoder"
    return Task(
        name="minilm", title="all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes", model=model,
        example={k: v[:2] for k, v in calib[0].items() if k != "labels"}, calib=calib,
        train=train, test=test,
        latency_input={k: v[:32] for k, v in test[0].items() if k != "labels"},
        scope=lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith(scope)),
        ignored=lambda m: [m.classifier, m.bert.pooler],
        loss=lambda m, b: m(**b).loss, budget_scope=scope, output=lambda out: out.logits,
        several_kinds=True, recovery_lr=5e-5,
    )


TASKS = {"cnn": cnn_task, "vit": vit_task, "minilm": minilm_task}


# ---- methods ------------------------------------------------------------------------------

ROUND_TO = 1
"""Our methods keep channels in multiples of this (``--round-to``)."""


def ours(criterion: str, **options: Any) -> Callable[[Task, float], torch.nn.Module]:
    def run(task: Task, size: float) -> torch.nn.Module:
        import surgery

        pruned, _ = surgery.prune(task.model, task.example, task.calib, sparsity=size,
                                  budget="params", budget_scope=task.budget_scope,
                                  criterion=criterion, target="output", round_to=ROUND_TO,
                                  **options)
        return pruned
    return run


def torch_pruning(kind: str) -> Callable[[Task, float], torch.nn.Module]:
    """Torch-Pruning's MetaPruner, its channel ratio bisected to remove ``size`` of params,
    followed by the same BatchNorm re-estimation our methods get."""
    def make(task: Task, ratio: float) -> torch.nn.Module:
        import torch_pruning as tp
        from _common import tp_fix_heads, tp_heads

        from surgery.cut.recovery import recalibrate_batchnorm

        model = copy.deepcopy(task.model)
        imp = {"magnitude": tp.importance.GroupMagnitudeImportance(p=2),
               "taylor": tp.importance.GroupTaylorImportance(),
               "random": tp.importance.RandomImportance()}[kind]
        heads = tp_heads(model)
        pruner = tp.pruner.MetaPruner(model, task.example, importance=imp, pruning_ratio=ratio,
                                      ignored_layers=task.ignored(model), num_heads=heads,
                                      output_transform=lambda out: task.output(out).sum())
        if kind == "taylor":
            model.zero_grad()
            for batch in task.calib[:4]:
                task.loss(model, batch).backward()
        pruner.step()
        tp_fix_heads(model, pruner, heads)
        model.zero_grad()
        recalibrate_batchnorm(model, task.calib)  # the same post-step our methods get
        return model.eval()

    def run(task: Task, size: float) -> torch.nn.Module:
        dense = task.scope(task.model)
        guess = 1 - (1 - size) ** 0.5  # a channel ratio cuts both sides of most matrices
        lo, hi = max(0.0, guess - 0.15), min(0.95, guess + 0.15)
        best = None
        for _ in range(12):
            mid = (lo + hi) / 2
            model = make(task, mid)
            removed = 1 - task.scope(model) / dense
            if best is None or abs(removed - size) < abs(best[0] - size):
                best = (removed, model)
            if abs(removed - size) < 0.005:
                break
            lo, hi = (mid, hi) if removed < size else (lo, mid)
        return best[1]
    return run


def unstructured(task: Task, size: float) -> torch.nn.Module:
    """Global L1 magnitude over every conv/linear weight in scope (masks, no speedup)."""
    import torch.nn.utils.prune as prune

    model = copy.deepcopy(task.model)
    ignored = set(map(id, task.ignored(model)))
    targets = [(m, "weight") for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and id(m) not in ignored]
    total = task.scope(model)
    prunable = sum(m.weight.numel() for m, _ in targets)
    amount = min(1.0, size * total / prunable)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for m, name in targets:
        prune.remove(m, name)
    return model.eval()


METHODS: dict[str, Callable[[Task, float], torch.nn.Module]] = {
    "ours: mi (joint)": ours("mi"),
    "ours: mi (joint), kinds alike": ours("mi", kind_weights="uniform"),
    "ours: mi_topk": ours("mi_topk"),
    "ours: act_weight": ours("act_weight"),
    "ours: taylor": ours("taylor"),
    "ours: magnitude": ours("magnitude"),
    "Torch-Pruning: group L2 magnitude": torch_pruning("magnitude"),
    "Torch-Pruning: group Taylor": torch_pruning("taylor"),
    "Torch-Pruning: random": torch_pruning("random"),
    "unstructured L1 magnitude": unstructured,
}


def movement(task: Task, size: float, epochs: int) -> tuple[torch.nn.Module, int]:
    """Movement pruning (Sanh et al. 2020, hard top-k with the straight-through estimator),
    unstructured, with its own training: ``epochs`` passes over the task's train split
    (``task.movement_train``, else ``task.train``; distillation from the dense model, the
    recovery's rate). Scores accumulate
    ``-W * dL/dW'`` (the gradient with respect to the masked weight W' = W * M, so masked
    weights keep moving and can come back); the lowest-scoring weights are masked on the
    paper's cubic schedule (no pruning for the first 10% of the steps, the final sparsity at
    70%, then training with the final mask). BatchNorm statistics are then re-estimated, as for
    every other method. Returns the model and the number of steps."""
    from surgery.cut.recovery import distill, recalibrate_batchnorm

    model = copy.deepcopy(task.model)
    ignored = set(map(id, task.ignored(model)))
    layers = [m for m in model.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and id(m) not in ignored]
    scores = {m: torch.zeros_like(m.weight) for m in layers}
    dense = {m: m.weight.detach().clone() for m in layers}
    total = sum(m.weight.numel() for m in layers)
    final = int(min(1.0, size * task.scope(model) / total) * total)
    train = task.movement_train or task.train
    steps = epochs * len(train)
    warmup, ramp = steps // 10, (7 * steps) // 10
    done = [0]

    def after_backward(student: torch.nn.Module) -> None:
        with torch.no_grad():
            for m in layers:
                if m.weight.grad is not None:
                    scores[m] -= m.weight.grad * dense[m]
                m.weight.copy_(dense[m])  # the optimiser updates the dense weights (STE)

    def on_step(student: torch.nn.Module) -> None:
        done[0] += 1
        with torch.no_grad():
            for m in layers:
                dense[m] = m.weight.detach().clone()
            progress = min(1.0, max(0.0, (done[0] - warmup) / max(1, ramp - warmup)))
            k = int(final * (1 - (1 - progress) ** 3))
            if k == 0:
                return
            threshold = torch.cat([scores[m].flatten() for m in layers]).kthvalue(k).values
            for m in layers:
                m.weight.mul_((scores[m] > threshold).to(m.weight.dtype))

    torch.manual_seed(0)
    distill(model, task.model, train, steps, lr=task.recovery_lr,
            after_backward=after_backward, on_step=on_step, progress=False)
    recalibrate_batchnorm(model, task.calib)
    return model.eval(), steps


def main() -> None:
    global ROUND_TO, TEST_IMAGES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(TASKS), default="cnn")
    parser.add_argument("--sizes", default="0.3,0.5,0.75")
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--movement-epochs", type=int, default=3,
                        help="movement pruning's own training, in epochs of the train split "
                             "(0: leave it out)")
    parser.add_argument("--methods", default="", help="comma-separated subset of methods")
    parser.add_argument("--round-to", type=int, default=1,
                        help="our methods keep channels in multiples of this")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES,
                        help="Fashion-MNIST test images to measure on (0: all 10,000)")
    args = parser.parse_args()
    if args.test_images < 0:
        parser.error(f"--test-images {args.test_images}: give a count of images, or 0 for all")
    ROUND_TO, TEST_IMAGES = args.round_to, args.test_images

    import surgery
    from surgery.cut.recovery import distill

    task = TASKS[args.model]()
    sizes = [float(s) for s in args.sizes.split(",")]
    wanted = [m for m in METHODS if not args.methods or any(w in m for w in args.methods.split(","))]
    if not task.several_kinds:  # one kind of group: "kinds alike" is plain "mi"
        wanted = [m for m in wanted if "kinds alike" not in m]
    dense_acc = task.evaluate(task.model)
    dense_params = task.scope(task.model)
    dense_lat = surgery.measure_latency(task.model, task.latency_input, repeats=5)

    def latency_ratio(model: torch.nn.Module) -> str:
        """Pruned over dense, timed interleaved (surgery.timing): both see the same load."""
        from surgery.timing import Speedup, time_interleaved

        s = time_interleaved({"dense": task.model, "pruned": model}, task.latency_input,
                             rounds=7)
        speed = Speedup.of(s["dense"], s["pruned"])
        return f"{1 / speed.ratio:.2f}x" + (" (noisy)" if speed.noisy else "")
    rows: list[dict] = []
    for size in sizes:
        for name in wanted:
            start = time.perf_counter()
            pruned = METHODS[name](task, size)
            seconds = time.perf_counter() - start
            acc = task.evaluate(pruned)
            lat = latency_ratio(pruned)
            torch.manual_seed(0)  # the same dropout draws for every method's fine-tune
            distill(pruned, task.model, task.train, args.recovery_steps, lr=task.recovery_lr)
            rows.append({
                "removed": f"{1 - task.scope(pruned) / dense_params:.0%}"
                if "unstructured" not in name else f"{size:.0%} (masked)",
                "target": size, "method": name, "no retraining": f"{acc:.3f}",
                "after recovery": f"{task.evaluate(pruned):.3f}",
                "latency vs dense": lat, "pruning s": f"{seconds:.1f}",
            })
            print(rows[-1], flush=True)
        if not args.movement_epochs:
            continue
        start = time.perf_counter()
        moved, steps = movement(task, size, args.movement_epochs)
        rows.append({
            "removed": f"{size:.0%} (masked)", "target": size,
            "method": f"movement pruning ({args.movement_epochs} epochs, {steps} steps of its "
                      "own training)", "no retraining": "-",
            "after recovery": f"{task.evaluate(moved):.3f}",
            "latency vs dense": latency_ratio(moved),
            "pruning s": f"{time.perf_counter() - start:.1f}",
        })
        print(rows[-1], flush=True)
    plot = _plot(task, rows, dense_acc, args.recovery_steps)
    body = (
        f"{task.title}; dense accuracy {dense_acc:.3f}, {dense_params:,} parameters in scope, "
        f"dense latency {dense_lat * 1e3:.1f} ms (batch 32). Accuracy on {task.test_size:,} test "
        "examples, the same for every row: its standard error, sqrt(p (1 - p) / n), is "
        f"{math.sqrt(dense_acc * (1 - dense_acc) / task.test_size):.3f} at the dense accuracy. "
        f"Recovery: {args.recovery_steps} "
        f"distillation steps (AdamW, lr {task.recovery_lr:g}, KL on logits at T=2), the same for "
        "every method. "
        f"Our methods: least-squares compensation and BatchNorm re-estimation on the "
        f"calibration batches, no labels"
        + (f", kept channels in multiples of {args.round_to}" if args.round_to > 1 else "")
        + f".\nMachine: {machine()}.\n\n"
        + markdown_table(rows, ["removed", "method", "no retraining", "after recovery",
                                "latency vs dense", "pruning s"])
        + f"\n\n![accuracy vs size]({plot.name})\n\nReproduce: `python benchmarks/"
        f"mi_vs_baselines.py --model {args.model} --sizes {args.sizes} --recovery-steps "
        f"{args.recovery_steps}" + (f" --methods '{args.methods}'" if args.methods else "")
        + (f" --round-to {args.round_to}" if args.round_to > 1 else "")
        + (f" --test-images {args.test_images}"
           if args.test_images != parser.get_default("test_images") and args.model != "minilm"
           else "")
        + f" --movement-epochs {args.movement_epochs}`.\n"
    )
    write_result(f"mi_vs_baselines_{task.name}", f"MI vs baselines: {task.title}", body)


def _plot(task: Task, rows: list[dict], dense_acc: float, recovery_steps: int) -> Path:
    """Accuracy vs share, with no retraining and after recovery side by side; one panel when
    there was no recovery (the two columns agree; movement pruning's rows, trained on their
    own, are drawn in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (("no retraining", "after recovery") if recovery_steps else ("after recovery",))
    titles = {"no retraining": "no retraining", "after recovery": (
        f"after {recovery_steps} recovery steps" if recovery_steps
        else "no retraining" + (" (movement pruning: after its own training)"
                                if any(r["method"].startswith("movement") for r in rows)
                                else ""))}
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns) + 3, 4),
                             sharey=True, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    for ax, column in zip(axes[0], columns):
        for i, method in enumerate(methods):
            pts = [(r["target"], float(r[column])) for r in rows
                   if r["method"] == method and r[column] != "-"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=colours(i),
                        linewidth=2.5 if method.startswith("ours: mi") else 1)
        ax.axhline(dense_acc, color="gray", linestyle=":", label="dense")
        ax.set_title(titles[column])
        ax.set_xlabel("share of parameters removed")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(task.title)
    fig.tight_layout()
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / f"mi_vs_baselines_{task.name}.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
