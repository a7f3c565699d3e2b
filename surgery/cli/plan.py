"""``surgery plan show DIR``: what a pruned folder's plan cut, per kind and per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli._common import app, console, friendly

plan_app = typer.Typer(no_args_is_help=True, help="Read the plan of a pruned folder.")
app.add_typer(plan_app, name="plan")


@plan_app.command("show")
@friendly
def show(
    folder: Annotated[Path, typer.Argument(
        help="A folder written by 'surgery prune' or surgery.io.save, or a plan.json file.")],
) -> None:
    """Per group kind: atoms kept of all; per layer that changes: parameters and MACs, dense
    and kept."""
    import surgery.io
    from surgery.cut.plan import PruningPlan

    plan = PruningPlan.load(folder) if folder.is_file() else surgery.io.load_plan(folder)
    console.print(plan.summary(), highlight=False, soft_wrap=True)
