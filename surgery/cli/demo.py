"""``surgery demo``: prune a real trained model on real data and print before/after.

Each demo writes its own folder (``surgery-demo-minilm/``, ``surgery-demo-resnet18/``,
``surgery-demo-smollm2/``), whole and at once, through ``surgery prune``: running one demo never
touches another's folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from surgery.cli._common import app, choice, console, criterion_names

Demo = choice("Demo", ("minilm", "resnet18", "smollm2"))
CriterionName = choice("CriterionName", criterion_names())

COMPARED = ("mi", "mi_topk", "act_weight", "magnitude", "random")
"""The criteria ``surgery demo resnet18`` compares side by side."""


@app.command()
def demo(
    task: Annotated[Demo, typer.Argument(help="minilm (the default: all-MiniLM-L6-v2 on Rotten "
                                              "Tomatoes), resnet18 (on Fashion-MNIST) or "
                                              "smollm2 (SmolLM2-135M on speeches).")
                    ] = "minilm",
    sparsity: Annotated[Optional[float], typer.Option(
        help="Share of the encoder's parameters (minilm; default 0.5), of MACs (resnet18; "
             "0.5) or of the decoder layers' parameters (smollm2; 0.2) to remove.")
    ] = None,
    criterion: Annotated[CriterionName, typer.Option(help="How atoms are ranked.")] = "mi",
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: surgery-demo-TASK/, replaced on every run).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace --out when it exists (the default folder always is).")
    ] = False,
) -> None:
    """Prune a real trained model on real data and print before/after.

    minilm: fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes once (cached), then runs
    'surgery prune' on it and leaves the pruned model, plan and report in --out.
    resnet18: trains a ResNet-18 on Fashion-MNIST once (cached), compares the criteria at 50%
    and 75% of MACs removed, then prunes it with --criterion into --out.
    smollm2: converts SmolLM2-135M-Instruct from its GGUF once (cached), then prunes 20% of
    its decoder layers' parameters (KV groups and FFN channels, sequential compensation, the
    log depth schedule) calibrated on the first 80% of the 2012 convention speeches,
    perplexity measured on the rest."""
    folder = out or Path(f"surgery-demo-{task}")
    replace = overwrite or out is None
    if task == "resnet18":
        return _demo_resnet18(sparsity or 0.5, str(criterion), folder, replace)
    if task == "smollm2":
        return _demo_smollm2(sparsity or 0.2, str(criterion), folder, replace)
    from surgery import demo as job

    data = job.minilm_folder_and_data(job.minilm_rotten_tomatoes(log=console.print),
                                      log=console.print)
    _prune(str(data), folder, replace, sparsity or 0.5, str(criterion),
           ["--budget", "params", "--budget-scope", "bert.encoder",
            "--data", str(data / "train.jsonl"), "--eval-data", str(data / "test.jsonl"),
            "--batch-size", "32", "--seq-len", "64", "--round-to", "16"])


def _demo_smollm2(sparsity: float, criterion: str, out: Path, replace: bool) -> None:
    """SmolLM2-135M-Instruct: ``surgery prune`` on its Hugging Face folder with the speeches
    as a plain text file (calibration: 32 windows of 256 tokens from the first 80%;
    perplexity: 32 windows from the rest), with the settings for deep models: sequential
    compensation and the log depth schedule."""
    from surgery.demo.smollm2 import smollm2_folder, speeches_file

    model = smollm2_folder(log=console.print)
    _prune(str(model), out, replace, sparsity, criterion,
           ["--budget", "params", "--budget-scope", "model.layers", "--kinds", "head,neuron",
            "--sequential", "--depth-schedule", "log", "--data", str(speeches_file()),
            "--seq-len", "256", "--batch-size", "4", "--latency-batch", "1"],
           calib_samples=32, eval_samples=32)


def _prune(model: str, out: Path, replace: bool, sparsity: float, criterion: str,
           options: list[str], calib_samples: int = 512, eval_samples: int = 2000) -> None:
    """``surgery prune`` on the demo's model, printed as a user would type it."""
    args = ["prune", model, "--out", str(out), "--sparsity", str(sparsity), "--criterion",
            criterion, "--calib-samples", str(calib_samples), "--eval-samples",
            str(eval_samples), *options]
    args += ["--overwrite"] if replace else []
    console.print("[bold]" + " ".join(["surgery", *args]))
    typer.main.get_command(app).main(args=args, prog_name="surgery", standalone_mode=False)


def _demo_resnet18(sparsity: float, criterion: str, out: Path, replace: bool) -> None:
    """ResNet-18 trained on Fashion-MNIST: every criterion at 50% and 75% of MACs removed, with
    the standard error of each accuracy, then ``surgery prune`` by ``criterion``."""
    import surgery
    from surgery import demo as job
    from surgery.counting import measure
    from surgery.demo.datasets import fashion_mnist

    calib_images, test_images = 512, 2000
    model = job.resnet18_fashion(log=console.print)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    calib_x, calib_y = job.prepare(train_x[-calib_images:]), train_y[-calib_images:]
    test_x, test_y = job.prepare(test_x[:test_images]), test_y[:test_images]
    calib = [(calib_x[i:i + 64], calib_y[i:i + 64]) for i in range(0, len(calib_x), 64)]
    tests = [(test_x[i:i + 256], test_y[i:i + 256]) for i in range(0, len(test_x), 256)]
    dense = measure(model, test_x[:1], batches=tests)
    table = Table(title=f"ResNet-18 / Fashion-MNIST: test accuracy ± standard error "
                        f"({test_images} images; dense {_acc(dense.accuracy, test_images)}), "
                        "BatchNorm re-estimated, least-squares compensation, no retraining")
    table.add_column("criterion")
    for share in (0.5, 0.75):
        table.add_column(f"{share:.0%} of MACs removed", justify="right")
    table.add_column("prune time (s)", justify="right")
    for crit in dict.fromkeys([criterion, *COMPARED]):
        cells, seconds = [], 0.0
        for share in (0.5, 0.75):
            start = time.perf_counter()
            with console.status(f"pruning {share:.0%} of MACs by {crit}..."):
                pruned, _ = surgery.prune(model, test_x[:2], calib, sparsity=share,
                                          criterion=crit)
            seconds += time.perf_counter() - start
            cells.append(_acc(measure(pruned, test_x[:1], batches=tests).accuracy, test_images))
        table.add_row(crit, *cells, f"{seconds / 2:.1f}")
    console.print(table)
    _prune("surgery.demo:resnet18_fashion", out, replace, sparsity, criterion,
           ["--input-size", "3,32,32", "--data", "fashion-mnist", "--batch-size", "64"])


def _acc(accuracy: float | None, n: int) -> str:
    if accuracy is None:
        return "n/a"
    return f"{accuracy:.3f} ± {(accuracy * (1 - accuracy) / n) ** 0.5:.3f}"
