"""``surgery prune --budget latency``: its options into a LatencySpec, its console line, and
its section of the report (the latency model's plot, asked against achieved)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

LATENCY_PLOT = "latency_model.png"


def parse_round_to(text: str) -> int | str:
    """``--round-to``: a whole number >= 1 or ``auto``."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--round-to must be a whole number >= 1 or 'auto', got {text!r}.")
    if value < 1:
        raise ValueError(f"--round-to must be a whole number >= 1 or 'auto', got {text!r}.")
    return value


def latency_settings(budget: str, speedup: float | None, target_ms: float | None,
                     backend: str, batch: int, device: str, threads: int) -> dict[str, Any]:
    """The PruneOptions fields of a latency budget (none for the other budgets; --speedup
    without --budget latency is refused there, with the reason)."""
    from surgery.budget.latency_spec import LatencySpec

    if budget != "latency":
        return {"target_speedup": speedup} if speedup is not None else {}
    if batch < 1:
        raise ValueError("--budget latency times at --latency-batch: give it a batch >= 1.")
    spec = LatencySpec(batch=batch, device=device, threads=threads or None, backend=backend,
                       target_ms=target_ms)
    return {"target_speedup": speedup, "latency": spec}


def latency_headline(plan: Any) -> str:
    """``asked 2.00x faster, modelled 2.01x, measured 1.97x (corrected once)``."""
    lat = plan.budget.get("latency") or {}
    words = f"asked {lat.get('asked_speedup', 0):.2f}x faster"
    if lat.get("modelled_speedup") is not None:
        words += f", modelled {lat['modelled_speedup']:.2f}x"
    if lat.get("achieved_speedup") is not None:
        words += f", measured {lat['achieved_speedup']:.2f}x"
    if lat.get("corrected"):
        words += " (corrected once)"
    return words + f" at batch {lat.get('batch')}"


def latency_section(plan: Any, folder: str | Path, plots: bool) -> tuple[list[str], list[str]]:
    """The report's "Latency budget" section as Markdown and HTML lines (empty for other
    budgets); draws ``latency_model.png`` into ``folder`` when ``plots``."""
    summary = plan.extra.get("latency_model")
    lat = plan.budget.get("latency")
    if not summary or not lat:
        return [], []
    drawn = False
    if plots:
        try:
            from surgery.cli.latency_plot import plot_latency_model

            plot_latency_model(summary, Path(folder) / LATENCY_PLOT)
            drawn = True
        except ImportError:
            drawn = False
    header = ["try", "asked for (model)", "modelled", "measured", "pruned / dense ms"]
    rows = [[str(i + 1), f"{a['target']:.2f}x", f"{a['modelled']:.2f}x",
             f"{a['achieved']:.2f}x [{a['quartiles'][0]:.2f}-{a['quartiles'][1]:.2f}]"
             if a.get("achieved") is not None else "not measured",
             f"{a['pruned_ms']:.1f} / {a['dense_ms']:.1f}" if a.get("pruned_ms") else ""]
            for i, a in enumerate(lat.get("attempts", []))]
    cliffs = "; ".join(
        f"{kind}: multiples of {c['multiple']} run {c['penalty']:.0%} faster"
        if c["multiple"] > 1 else f"{kind}: no preferred multiple"
        for kind, c in (summary.get("cliffs") or {}).items()) or "no layer swept"
    intro = (f"Asked {lat['asked_speedup']:.2f}x faster on {lat['device']} at batch "
             f"{lat['batch']} ({lat['backend']}); the latency table was "
             f"{'read from the cache' if lat.get('table_cached') else 'measured now'}. "
             f"Width sweeps: {cliffs}; kept channels rounded to multiples of "
             f"{plan.budget.get('round_to')}. A measured miss of more than 5% is corrected "
             "once, asking the model for the asked speedup times its own error.")
    md = ["## Latency budget", "", intro, "", "| " + " | ".join(header) + " |",
          "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
    h = ["<h2>Latency budget</h2>", f"<p>{html.escape(intro)}</p>", "<table><tr>"
         + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
         + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows) + "</table>"]
    if drawn:
        md += [f"![latency model]({LATENCY_PLOT})", ""]
        h.append(f"<img src='{LATENCY_PLOT}' alt='latency model'>")
    return md, h


__all__ = ["LATENCY_PLOT", "latency_headline", "latency_section", "latency_settings",
           "parse_round_to"]
