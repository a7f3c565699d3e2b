"""The report of a prune (Markdown + HTML + PNG).

The report says what was cut per coupled group (a bar chart of the kept fraction per group,
coloured by the group's kind: channel, head, neuron, hidden), parameters and MACs before and
after, accuracy and latency when data was given, and the exact command and library versions
that reproduce it.
"""

from __future__ import annotations

import html
import json
import math
import platform
import re
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from surgery.cli.plots import plot_cost, plot_kept
from surgery.counting import Measurement
from surgery.timing import Speedup

KEPT_PLOT, COST_PLOT = "kept_per_group.png", "params_macs.png"


# ---- provenance -----------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """Versions of everything that decides the result: python, torch, timm, transformers ..."""
    import surgery

    out = {"surgery": surgery.__version__, "python": platform.python_version(),
           "platform": platform.platform()}
    commit = _git_commit(Path(surgery.__file__).resolve().parent.parent)
    if commit:
        out["surgery commit"] = commit
    for name in ("torch", "torchvision", "timm", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "not installed"
    return out


def _git_commit(folder: Path) -> str | None:
    if not (folder / ".git").exists():
        return None
    try:
        res = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "surgery",
                                "plugins"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")


# ---- plots ----------------------------------------------------------------------------------


# ---- the report -----------------------------------------------------------------------------

def _fmt_int(v: int | None) -> str:
    return "n/a" if v is None else f"{v:,}"


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}x") -> str:
    return fmt.format(b / a) if a and b is not None else ""


def summary_rows(dense: Measurement, pruned: Measurement,
                 speedup: Speedup | None = None) -> list[list[str]]:
    """The before/after table: params, MACs, accuracy with its standard error, latency (the
    speed change from ``speedup``, the interleaved per-round ratio, when given)."""
    rows = [
        ["parameters", _fmt_int(dense.params), _fmt_int(pruned.params),
         _ratio(dense.params, pruned.params)],
        ["MACs / sample", _fmt_int(dense.macs), _fmt_int(pruned.macs),
         _ratio(dense.macs, pruned.macs)],
    ]
    if dense.accuracy is not None or pruned.accuracy is not None:
        da, pa = dense.accuracy, pruned.accuracy
        rows.append([f"accuracy ({pruned.samples or dense.samples} samples, ± standard error)",
                     _accuracy(da, dense.samples), _accuracy(pa, pruned.samples),
                     f"{pa - da:+.4f}" if da is not None and pa is not None else ""])
    if dense.perplexity is not None or pruned.perplexity is not None:
        dp, pp = dense.perplexity, pruned.perplexity
        rows.append([f"perplexity ({(pp or dp).tokens:,} tokens in {(pp or dp).windows} "
                     "windows, ± standard error)", dp.text() if dp else "n/a",
                     pp.text() if pp else "n/a",
                     f"{pp.value / dp.value:.2f}x" if dp and pp else ""])
    if dense.latency_ms is not None or pruned.latency_ms is not None:
        dl, pl = dense.latency_ms, pruned.latency_ms
        change = speedup.text() if speedup is not None else (
            Speedup(dl / pl, dl / pl, dl / pl, 1).text() if dl and pl else "")
        what = "prefill latency" if (dense.perplexity or pruned.perplexity) else "latency"
        rows.append([f"{what}, batch {pruned.latency_batch or dense.latency_batch} (ms, "
                     "median)", "n/a" if dl is None else f"{dl:.2f}",
                     "n/a" if pl is None else f"{pl:.2f}", change])
    if dense.tokens_per_s is not None or pruned.tokens_per_s is not None:
        dt, pt = dense.tokens_per_s, pruned.tokens_per_s
        rows.append([f"generation, {pruned.new_tokens or dense.new_tokens} tokens (tokens/s, "
                     "median)", "n/a" if dt is None else f"{dt:.1f}",
                     "n/a" if pt is None else f"{pt:.1f}",
                     Speedup(pt / dt, pt / dt, pt / dt, 1).text() if dt and pt else ""])
    return rows


def _accuracy(value: float | None, samples: int | None) -> str:
    if value is None:
        return "n/a"
    if not samples:
        return f"{value:.4f}"
    return f"{value:.4f} ± {math.sqrt(value * (1 - value) / samples):.4f}"


def group_rows(plan: Any) -> list[list[str]]:
    return [[str(g.id), g.name, g.kind, str(g.atoms), str(len(g.kept)),
             f"{len(g.kept) / g.atoms:.0%}" if g.atoms else ""] for g in plan.groups]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Markdown text with `code` spans as HTML: escaped, the spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(folder: str | Path, *, plan: Any, model: str, command: str,
                 dense: Measurement, pruned: Measurement, settings: dict[str, Any],
                 seconds: float | None = None, speedup: Speedup | None = None,
                 loads: str | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html``, the plots and ``metrics.json`` into ``folder``;
    ``loads``: what loads the pruned model's folder (a paragraph after the introduction)."""
    folder = Path(folder)
    try:
        plot_kept(plan, folder / KEPT_PLOT)
        plot_cost(dense, pruned, folder / COST_PLOT)
        plots = True
    except ImportError:  # matplotlib is the optional [plots] extra
        plots = False
    vers = versions()
    summary_header = ["", "dense", "pruned", "change"]
    groups_header = ["id", "group", "kind", "atoms", "kept", "kept %"]
    settings_rows = [[k, json.dumps(v) if not isinstance(v, str) else v]
                     for k, v in settings.items()]
    kinds: dict[str, list[int]] = {}
    for g in plan.groups:
        k = kinds.setdefault(g.kind, [0, 0])
        k[0] += g.atoms
        k[1] += len(g.kept)
    kind_rows = [[k, str(a), str(b), f"{b / a:.0%}" if a else ""] for k, (a, b) in kinds.items()]
    title = f"surgery report: {model}"
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    intro = (f"Pruned by `{plan.criterion}` (target `{plan.target}`){took}: "
             f"{len(plan.groups)} prunable coupled groups, "
             f"{sum(len(g.kept) for g in plan.groups)} of {sum(g.atoms for g in plan.groups)} "
             f"atoms kept ({plan.kept_fraction():.0%}).")
    budget = plan.budget
    if budget.get("scope") and budget.get("kind") == "params" and budget.get("dense_params"):
        scope = ", ".join(f"`{p}`" for p in budget["scope"])
        intro += (f" Budget: {budget['sparsity']:.0%} of the parameters in {scope}, "
                  f"{_fmt_int(budget['dense_params'])} -> {_fmt_int(budget['estimated_params'])}"
                  f" ({1 - budget['estimated_params'] / budget['dense_params']:.1%} removed; the "
                  "table counts every parameter).")
    recal = plan.extra.get("recalibrated_batchnorms")
    if recal:
        intro += f" BatchNorm statistics re-estimated on the calibration data ({recal} layers)."
    if plan.extra.get("compensated"):
        walked = plan.extra.get("sequential_compensation")
        how = (f", {walked['groups']} groups bottom-up on the cut model's own activations"
               if walked else "")
        intro += (f" {_count(plan.extra['compensated'])} layers reading a cut group refitted by "
                  f"least squares{how}.")
    gains = plan.extra.get("norm_gains")
    if gains:
        intro += (f" {_count(list(gains))} norms across cut hidden dims rescaled by one gain "
                  f"each ({min(gains.values()):.3f} to {max(gains.values()):.3f}).")
    fallbacks = plan.extra.get("fallbacks") or {}
    if fallbacks:
        intro += (f" {len(fallbacks)} group(s) could not be scored as asked: "
                  + "; ".join(f"`{name}`: {why}" for name, why in fallbacks.items()) + ".")
    loading = f"Loading: {loads}." if loads else None
    no_plots = "(No plots: pip install 'model-surgery[plots]' for matplotlib.)"
    cost_img = f"![params and MACs]({COST_PLOT})" if plots else no_plots
    kept_img = f"![kept per group]({KEPT_PLOT})" if plots else no_plots
    cost_tag = f"<img src='{COST_PLOT}' alt='params and MACs'>" if plots else f"<p>{no_plots}</p>"
    kept_tag = f"<img src='{KEPT_PLOT}' alt='kept per group'>" if plots else f"<p>{no_plots}</p>"

    from surgery.cli.latency_cli import latency_section

    latency_md, latency_html = latency_section(plan, folder, plots)
    md = [f"# {title}", "", intro, "", *([loading, ""] if loading else []),
          "## Before and after", "",
          _md_table(summary_header, summary_rows(dense, pruned, speedup)), "",
          cost_img, "", *latency_md, "## What was cut", "",
          _md_table(["kind", "atoms", "kept", "kept %"], kind_rows), "",
          kept_img, "", _md_table(groups_header, group_rows(plan)), "",
          "## Settings", "", _md_table(["setting", "value"], settings_rows), "",
          "## Reproduce", "", "```bash", command, "```", "",
          _md_table(["package", "version"], [[k, v] for k, v in vers.items()]), ""]
    (folder / "report.md").write_text("\n".join(md))

    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}td:nth-child(2),td:first-child{text-align:left}"
             "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}"
             "code{background:#f4f4f4;padding:0 3px;border-radius:3px}")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{style}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>", f"<p>{_inline_html(intro)}</p>",
         *([f"<p>{_inline_html(loading)}</p>"] if loading else []),
         "<h2>Before and after</h2>",
         _html_table(summary_header, summary_rows(dense, pruned, speedup)),
         cost_tag, *latency_html, "<h2>What was cut</h2>",
         _html_table(["kind", "atoms", "kept", "kept %"], kind_rows),
         kept_tag,
         _html_table(groups_header, group_rows(plan)),
         "<h2>Settings</h2>", _html_table(["setting", "value"], settings_rows),
         "<h2>Reproduce</h2>", f"<pre>{html.escape(command)}</pre>",
         _html_table(["package", "version"], [[k, v] for k, v in vers.items()]),
         "</body></html>"]
    (folder / "report.html").write_text("\n".join(h))
    (folder / "metrics.json").write_text(json.dumps(
        {"dense": asdict(dense), "pruned": asdict(pruned),
         "speedup": asdict(speedup) if speedup is not None else None, "command": command,
         "versions": vers, "settings": settings, "seconds": seconds}, indent=1))
    names = ("report.md", "report.html", "metrics.json") + ((KEPT_PLOT, COST_PLOT) if plots else ())
    if latency_md and (folder / "latency_model.png").exists():
        names += ("latency_model.png",)
    return [folder / n for n in names]


def _count(value: Any) -> int:
    return value if isinstance(value, int) else len(value) if hasattr(value, "__len__") else 0
