"""What the commands share: the Typer app, consoles, progress bars, error handling, and the
options several commands take (as ``Annotated`` aliases, so each has one help text)."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Optional

import typer
from rich import progress as rp
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prune PyTorch models by mutual information, for real.")
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        import surgery

        console.print(f"surgery {surgery.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """Prune PyTorch models by mutual information, for real."""
    _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' own tqdm bars and load reports would interleave with the Rich progress
    bars: its bars are off, and only its errors show unless TRANSFORMERS_VERBOSITY says
    otherwise."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


KIND_NOUNS = {"hidden": "hidden dims"}
"""How the summary names atoms of a kind (default: the kind plus "s")."""


MODEL_HELP = ("timm or torchvision model name, 'timm:NAME' / 'torchvision:NAME', a local Hugging "
              "Face folder, a causal LM's .gguf file, or 'module:factory' (a callable returning "
              "a model or (model, example_inputs)).")
DATA_HELP = ("'fashion-mnist[:train|:test]', an ImageFolder directory, a .csv/.jsonl of texts "
             "with labels, a .txt of plain text for a causal LM ('FILE.txt[:train|:test|:all]'; "
             "first 80% calibrates, the rest evaluates), or 'module:function' yielding batches.")


def default_batch(inputs: dict[str, Any]) -> int:
    """Batch size when none is given: 8 windows for a causal language model (its logits are
    tokens x vocabulary per window), else 64."""
    return 8 if inputs.get("kind") == "causal" else 64


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors become one red line and exit code 1 (SURGERY_DEBUG=1: the full traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            from rich.markup import escape

            cli_error = type(exc).__module__.startswith(("click", "typer"))
            if os.environ.get("SURGERY_DEBUG") or cli_error:
                raise
            from surgery.errors import SurgeryError

            kind = "" if isinstance(exc, (SurgeryError, ValueError, OSError)) else \
                f"{type(exc).__name__}: "
            err_console.print(f"[bold red]error:[/] {escape(kind + str(exc))}")
            if kind:
                err_console.print("(set SURGERY_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


class Stages:
    """Rich progress bars, one per stage; ``stages(stage, i)`` marks item ``i`` of it done (the
    callback ``surgery.prune(progress=...)`` takes)."""

    LABELS = {"calibrate": "calibrating (batches)", "score": "scoring groups top-down",
              "search": "trying per-kind cut rates (candidates)",
              "compensate": "refitting bottom-up (layers)"}

    def __init__(self, progress: rp.Progress, totals: dict[str, int | None] | None = None) -> None:
        self.progress, self.totals, self.tasks = progress, dict(totals or {}), {}

    def __call__(self, stage: str, i: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage),
                                                      total=self.totals.get(stage))
        self.progress.update(self.tasks[stage], completed=i + 1)

    def callback(self, stage: str) -> Callable[[int], None]:
        return lambda i: self(stage, i)

    def finish(self) -> None:
        done = {t.id: t.completed for t in self.progress.tasks}
        for task in self.tasks.values():
            self.progress.update(task, total=done.get(task, 0), completed=done.get(task, 0))


@contextlib.contextmanager
def stages(totals: dict[str, int | None] | None = None) -> Iterator[Stages]:
    columns = (rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
               rp.MofNCompleteColumn(), rp.TimeElapsedColumn())
    with rp.Progress(*columns, console=console) as progress:
        s = Stages(progress, totals)
        try:
            yield s
        finally:
            s.finish()


def pick_device(name: str, threads: int = 0) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu.")
    return name


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} must be numbers separated by commas.") from exc


def parse_kind_weights(text: str | None) -> dict[str, float] | str | None:
    """``--kind-weights``: ``search``, ``uniform``, or ``kind=weight`` pairs separated by
    commas."""
    if not text or text in ("search", "uniform"):
        return text or None
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as exc:
        raise ValueError(f"--kind-weights {text!r} must be 'search', 'uniform' or kind=weight "
                         "pairs separated by commas, e.g. neuron=1,head=0.5,hidden=0.25.") from exc


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} must be integers separated by commas.") from exc
    if not values or min(values) < 1:
        raise ValueError(f"{what} {text!r} must be positive integers, like 1,32.")
    return values


def command_line(ctx: typer.Context) -> str:
    """The running command with every option spelled out (what the report says to rerun)."""
    parts = ["surgery", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif value is None or not param.opts:
            continue
        elif getattr(param, "is_flag", False):
            if value:
                parts.append(param.opts[0])
            elif param.secondary_opts:
                parts.append(param.secondary_opts[0])
        elif isinstance(value, (list, tuple)):  # a repeatable option: once per value
            for item in value:
                parts += [param.opts[0], str(item)]
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder.")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r} already exists; pass --overwrite or another --out.")


def load_model_spec(spec: str, **options: Any):
    """The model a MODEL spec names; says on the console when it has random weights (a timm
    or torchvision name without --checkpoint), since every figure about it means little."""
    from surgery.cli.specs import load_model, parse_size

    options["input_size"] = parse_size(options.get("input_size"))
    if ":" in spec and not spec.startswith(("timm:", "torchvision:")):
        loaded = load_model(spec, **options)  # a factory: it may show progress of its own
    else:
        with console.status(f"loading {spec}..."):
            loaded = load_model(spec, **options)
    if loaded.recipe["source"] in ("timm", "torchvision") and not loaded.recipe.get("checkpoint"):
        err_console.print(
            f"[yellow]warning:[/] {spec} has random weights (seed {loaded.recipe['seed']}): no "
            "hub is used and no --checkpoint was given, so accuracy and MI scores describe an "
            "untrained network; pass --checkpoint WEIGHTS for a trained one.")
    return loaded


def label2id_of(model: Any) -> dict[str, int] | None:
    mapping = getattr(getattr(model, "config", None), "label2id", None)
    return dict(mapping) if mapping else None


def summary_table(title: str, rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for col in ("", "dense", "pruned", "change"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


# ---- options shared by the commands (Annotated aliases: one definition, one help text) ------

def choice(name: str, names: Iterable[str]) -> type[enum.StrEnum]:
    """An option type whose values are ``names`` (Typer lists them in the help and refuses
    anything else naming the valid ones); the values are plain strings (``StrEnum``)."""
    return enum.StrEnum(name, {n: n for n in names})


def criterion_names() -> list[str]:
    """Every criterion the registry and the installed plugins offer, ``mi`` first."""
    from surgery.plugins._manager import call_hook, merged
    from surgery.scoring import CRITERIA

    names = set(CRITERIA) | set(merged(call_hook("surgery_criteria")))
    return sorted(names, key=lambda n: (n != "mi", n))


def estimator_names() -> list[str]:
    from surgery.plugins._manager import call_hook, merged
    from surgery.scoring import ESTIMATORS

    return sorted(set(ESTIMATORS) | set(merged(call_hook("surgery_estimators"))),
                  key=lambda n: (n != "gaussian", n))


Checkpoint = Annotated[Optional[Path], typer.Option(
    help="Weights: .safetensors or .pth state dict.")]
InputSize = Annotated[Optional[str], typer.Option(
    help="Input shape without batch, e.g. 3,224,224.")]
NumClasses = Annotated[Optional[int], typer.Option(
    min=1, help="Classifier size for timm/torchvision.")]
SeqLen = Annotated[int, typer.Option(min=1, help="Token sequence length for text models.")]
Tokenizer = Annotated[Optional[str], typer.Option(help="Tokenizer folder (default: the model's).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Threads = Annotated[int, typer.Option(min=0, help="CPU threads for torch (0: torch's default; 1 "
                                                  "is steadier on a busy machine).")]
Resize = Annotated[Optional[int], typer.Option(
    min=1, help="Images: shorter side before the centre crop.")]
Mean = Annotated[Optional[str], typer.Option(help="Images: normalisation mean, e.g. 0.5,0.5,0.5.")]
Std = Annotated[Optional[str], typer.Option(help="Images: normalisation std.")]
TextColumn = Annotated[Optional[str], typer.Option(help="Texts: the column with the text.")]
LabelColumn = Annotated[str, typer.Option(help="Texts: the column with the label.")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write results as JSON.")]
PrunedFolderArg = Annotated[Path, typer.Argument(help="A folder written by 'surgery prune'.")]


def open_folder(folder: Path, device: str):
    from surgery.cli.folders import load_pruned

    with console.status(f"rebuilding the pruned model from {folder}..."):
        pruned = load_pruned(folder, device)
    dense = None
    try:
        with console.status("rebuilding the dense model..."):
            dense = pruned.dense().to(device)
    except Exception as exc:  # the comparison is a bonus; the pruned model still runs
        err_console.print(f"[yellow]warning:[/] no dense model to compare with: {exc}")
    return pruned, dense


def write_json(path: Optional[Path], payload: dict[str, Any]) -> None:
    """``payload`` as JSON (dataclasses inside it as objects)."""
    if path is not None:
        path.write_text(json.dumps(payload, indent=1, default=_plain))
        console.print(f"results written to {path}")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def describe_inputs(inputs: dict[str, Any]) -> str:
    if inputs["kind"] == "image":
        return "x".join(str(v) for v in inputs["shape"])
    if inputs["kind"] in ("text", "causal"):
        return f"{inputs['seq_len']} tokens"
    return "from the factory"
