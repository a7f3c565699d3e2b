"""``surgery inspect``: a model's coupled channel groups, params and MACs, and a drawing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from surgery.cli._common import (
    MODEL_HELP,
    Checkpoint,
    InputSize,
    NumClasses,
    SeqLen,
    Tokenizer,
    app,
    console,
    describe_inputs,
    friendly,
    load_model_spec,
)


@app.command()
@friendly
def inspect(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    graph: Annotated[Optional[Path], typer.Option(
        help="Draw the group structure to this .svg, .png or .pdf.")] = None,
    checkpoint: Checkpoint = None,
    input_size: InputSize = None,
    num_classes: NumClasses = None,
    seq_len: SeqLen = 128,
    tokenizer: Tokenizer = None,
    size: Annotated[Optional[int], typer.Option(hidden=True, help="Old spelling of "
                                                                  "--input-size.")] = None,
) -> None:
    """Show a model's coupled channel groups (sizes, prunable or why not), params and MACs."""
    import surgery
    from surgery.graph.groups import OUTPUT

    if size is not None and input_size is None:
        input_size = f"3,{size},{size}"
    if graph is not None and graph.suffix.lower() not in (".svg", ".png", ".pdf"):
        raise ValueError(f"--graph {str(graph)!r} must end in .svg or .png (or .pdf).")
    loaded = load_model_spec(model, checkpoint=checkpoint, input_size=input_size,
                             num_classes=num_classes, seq_len=seq_len, tokenizer=tokenizer)
    x = loaded.example_inputs(1)
    with console.status("tracing and finding coupled channel groups..."):
        coupling = surgery.couple(loaded.model, x)
    table = Table(title=f"{model}: {len(coupling.prunable)} prunable of "
                        f"{len(coupling.groups)} coupled groups")
    for col in ("id", "group", "kind", "atoms", "params touched", "read into", "prunable"):
        numeric = col in ("id", "atoms", "params touched")
        table.add_column(col, justify="right" if numeric else "left", overflow="fold")
    for g in coupling.groups:
        targets = sorted({r.target for r in coupling.relations if r.group == g.id})
        into = ", ".join("output" if t == OUTPUT else str(t) for t in targets) or "-"
        table.add_row(str(g.id), g.name, g.kind, str(g.atoms), str(len(g.params)), into,
                      "yes" if g.prunable else f"no: {g.reason}")
    console.print(table)
    console.print(f"params {surgery.count_params(loaded.model):,}  "
                  f"MACs {surgery.count_macs(loaded.model, x):,} (one sample, input "
                  f"{describe_inputs(loaded.inputs)})")
    if graph is not None:
        from surgery.cli.group_graph import draw_groups

        graph.parent.mkdir(parents=True, exist_ok=True)
        draw_groups(coupling, graph)
        console.print(f"group structure drawn to {graph}")


