"""``surgery demo``: prune a real trained model on real data and print before/after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surgery.cli._common import app, choice, console, criterion_names

Demo = choice("Demo", ("minilm", "resnet18"))
CriterionName = choice("CriterionName", criterion_names())


@app.command()
def demo(
    task: Annotated[Demo, typer.Argument(help="minilm (the default: all-MiniLM-L6-v2 on Rotten "
                                              "Tomatoes) or resnet18 (on Fashion-MNIST).")
                    ] = "minilm",
    sparsity: Annotated[float, typer.Option(
        help="Share of the encoder's parameters (minilm) or of "
                                              "MACs (resnet18) to remove.")] = 0.5,
    criterion: Annotated[CriterionName, typer.Option(help="How atoms are ranked.")] = "mi",
    out: Annotated[Path, typer.Option(help="Output folder (replaced).")] = Path("surgery-demo"),
) -> None:
    """Prune a real trained model on real data and print before/after.

    minilm: fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes once (cached), then runs
    'surgery prune' on it and leaves the pruned model, plan and report in --out."""
    if task == "resnet18":
        return _demo_resnet18(sparsity, criterion, out)
    from surgery import demo as job

    with console.status("loading or fine-tuning all-MiniLM-L6-v2 on Rotten Tomatoes (about 3 "
                        "minutes the first time)..."):
        folder = job.minilm_folder_and_data(job.minilm_rotten_tomatoes(log=console.print),
                                            log=console.print)
    args = ["prune", str(folder), "--out", str(out), "--overwrite", "--sparsity", str(sparsity),
            "--budget", "params", "--budget-scope", "bert.encoder", "--criterion", criterion,
            "--data", str(folder / "train.jsonl"), "--eval-data", str(folder / "test.jsonl"),
            "--calib-samples", "512", "--eval-samples", "2000", "--batch-size", "32",
            "--seq-len", "64", "--round-to", "16"]
    console.print("[bold]" + " ".join(["surgery", *args]))
    typer.main.get_command(app).main(args=args, prog_name="surgery", standalone_mode=False)


def _demo_resnet18(sparsity: float, criterion: str, out: Path) -> None:
    """ResNet-18 trained on Fashion-MNIST, pruned by ``criterion`` and the baselines."""
    import torch

    import surgery
    from surgery import demo as job
    from surgery.counting import Measurement, measure
    from surgery.demo.datasets import fashion_mnist

    calib_images, test_images = 512, 2000
    torch.manual_seed(0)
    with console.status("loading or training ResNet-18 on Fashion-MNIST..."):
        model = job.resnet18_fashion(log=console.print)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    calib_x = job.prepare(train_x[-calib_images:])
    calib_y = train_y[-calib_images:]
    test_x, test_y = job.prepare(test_x[:test_images]), test_y[:test_images]
    calib = [(calib_x[i:i + 64], calib_y[i:i + 64]) for i in range(0, len(calib_x), 64)]
    tests = [(test_x[i:i + 256], test_y[i:i + 256]) for i in range(0, len(test_x), 256)]

    def measured(net: torch.nn.Module) -> Measurement:
        return measure(net, test_x[:1], batches=tests, latency_inputs=test_x[:32],
                       latency_batch=32)

    with console.status("measuring the dense model..."):
        dense = measured(model)
    results = {}
    for crit in dict.fromkeys([criterion, "mi_topk", "act_weight", "magnitude", "random"]):
        start = time.perf_counter()
        with console.status(f"pruning {sparsity:.0%} of MACs by {crit}..."):
            pruned, plan = surgery.prune(model, test_x[:2], calib, sparsity=sparsity,
                                         criterion=crit, target="output")
        seconds = time.perf_counter() - start
        with console.status(f"measuring the model pruned by {crit}..."):
            results[crit] = (measured(pruned), seconds, plan)
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
