"""The ``surgery`` command line (Typer + Rich)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prune PyTorch models by mutual information, for real.")
console = Console()


@app.command()
def demo(
    sparsity: float = typer.Option(0.5, help="Share of MACs to remove."),
    criterion: str = typer.Option("mi", help="mi, mi_topk, magnitude or random."),
    out: Path = typer.Option(Path("surgery-demo"), help="Folder for the plan."),
    calib_images: int = typer.Option(512, help="Calibration images."),
    test_images: int = typer.Option(2000, help="Test images for accuracy."),
) -> None:
    """Prune a ResNet-18 trained on real Fashion-MNIST and print before/after."""
    import torch

    import surgery
    from surgery import demo as job
    from surgery.datasets import fashion_mnist

    torch.manual_seed(0)
    with console.status("loading or training ResNet-18 on Fashion-MNIST..."):
        model = job.resnet18_fashion(log=console.print)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    calib_x = job.prepare(train_x[-calib_images:])
    calib_y = train_y[-calib_images:]
    test_x, test_y = job.prepare(test_x[:test_images]), test_y[:test_images]
    calib = [(calib_x[i:i + 64], calib_y[i:i + 64]) for i in range(0, len(calib_x), 64)]

    with console.status("measuring the dense model..."):
        dense = job.measure(model, test_x, test_y, batch=32)
    results = {}
    for crit in dict.fromkeys([criterion, "mi_topk", "magnitude", "random"]):
        start = time.perf_counter()
        with console.status(f"pruning {sparsity:.0%} of MACs by {crit}..."):
            pruned, plan = surgery.prune(model, test_x[:2], calib, sparsity=sparsity,
                                         criterion=crit, target="output")
        seconds = time.perf_counter() - start
        with console.status(f"measuring the model pruned by {crit}..."):
            results[crit] = (job.measure(pruned, test_x, test_y, batch=32), seconds, plan)
    after, seconds, plan = results[criterion]

    groups = Table(title=f"coupled channel groups cut by {criterion} ({len(plan.groups)} prunable)")
    for col in ("group", "kind", "atoms", "kept"):
        groups.add_column(col, justify="right" if col in ("atoms", "kept") else "left")
    for g in plan.groups:
        groups.add_row(g.name, g.kind, str(g.atoms), str(len(g.kept)))
    console.print(groups)

    table = Table(title=f"ResNet-18 / Fashion-MNIST, {sparsity:.0%} of MACs removed by {criterion} "
                        f"(pruned in {seconds:.1f} s; BatchNorm statistics re-estimated, "
                        "no retraining)")
    for col in ("", "dense", "pruned", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("test accuracy", f"{dense.accuracy:.3f}", f"{after.accuracy:.3f}",
                  f"{after.accuracy - dense.accuracy:+.3f}")
    table.add_row("parameters", f"{dense.params:,}", f"{after.params:,}",
                  f"{after.params / dense.params:.2f}x")
    table.add_row("MACs / image", f"{dense.macs:,}", f"{after.macs:,}",
                  f"{after.macs / dense.macs:.2f}x")
    table.add_row("latency, batch 32 (ms)", f"{dense.latency_ms:.1f}", f"{after.latency_ms:.1f}",
                  f"{dense.latency_ms / after.latency_ms:.2f}x faster")
    console.print(table)
    others = Table(title="same budget, other criteria (test accuracy)")
    for col in ("criterion", "accuracy", "pruning time (s)"):
        others.add_column(col, justify="right")
    for crit, (m, secs, _) in results.items():
        others.add_row(crit, f"{m.accuracy:.3f}", f"{secs:.1f}")
    console.print(others)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    console.print(f"plan written to {out / 'plan.json'}")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="timm or torchvision model name."),
    size: int = typer.Option(224, help="Input image size."),
) -> None:
    """Show a model's coupled channel groups, params and MACs."""
    import torch

    import surgery

    net = _build(model)
    x = torch.randn(1, 3, size, size)
    coupling = surgery.couple(net, x)
    table = Table(title=f"{model}: {len(coupling.prunable)} prunable of {len(coupling.groups)} groups")
    for col in ("id", "group", "atoms", "params touched", "prunable"):
        table.add_column(col)
    for g in coupling.groups:
        table.add_row(str(g.id), g.name, str(g.atoms), str(len(g.params)),
                      "yes" if g.prunable else f"no: {g.reason}")
    console.print(table)
    console.print(f"params {surgery.count_params(net):,}  MACs {surgery.count_macs(net, x):,}")


def _build(name: str):
    import timm
    import torchvision

    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name).eval()
    try:
        return timm.create_model(name).eval()
    except RuntimeError as exc:
        raise typer.BadParameter(f"{name!r} is neither a torchvision nor a timm model name.") from exc


def main() -> None:
    app()


if __name__ == "__main__":
    main()
