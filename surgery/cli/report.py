"""The report of a prune (Markdown + HTML + PNG).

The report says what was cut per coupled group (a bar chart of the kept fraction per group,
coloured by the group's kind: channel, head, neuron, hidden), parameters and MACs before and
after, accuracy and latency when data was given, and the exact command and library versions
that reproduce it.
"""

from __future__ import annotations

import html
import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from surgery.counting import Measurement

KIND_COLORS = {"channel": "#1f77b4", "head": "#ff7f0e", "neuron": "#2ca02c", "hidden": "#d62728"}
OTHER_COLOR = "#7f7f7f"
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

def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'model-surgery[plots]'.") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kept(plan: Any, path: str | Path) -> Path:
    """Horizontal bars: kept fraction per prunable group, coloured by kind."""
    plt = _pyplot()
    groups = list(plan.groups)
    n = max(1, len(groups))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * n))
    names = [f"{g.id}: {g.name}" for g in groups]
    fractions = [len(g.kept) / g.atoms if g.atoms else 1.0 for g in groups]
    colors = [KIND_COLORS.get(g.kind, OTHER_COLOR) for g in groups]
    y = list(range(len(groups)))
    ax.barh(y, fractions, color=colors)
    for yi, g, f in zip(y, groups, fractions):
        ax.text(min(f, 1.0) + 0.01, yi, f"{len(g.kept)}/{g.atoms}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("kept fraction of the group's atoms")
    kind = plan.budget.get("kind", "?")
    ax.set_title(f"kept per coupled group ({plan.criterion}, {kind} budget)")
    kinds = list(dict.fromkeys(g.kind for g in groups))
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=KIND_COLORS.get(k, OTHER_COLOR), label=k) for k in kinds],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost(dense: Measurement, pruned: Measurement, path: str | Path) -> Path:
    """Params, MACs (and latency when measured) of the pruned model relative to the dense."""
    plt = _pyplot()
    labels = ["params", "MACs"]
    ratios = [pruned.params / dense.params if dense.params else 1.0,
              pruned.macs / dense.macs if dense.macs else 1.0]
    if dense.latency_ms and pruned.latency_ms:
        labels.append(f"latency (batch {pruned.latency_batch})")
        ratios.append(pruned.latency_ms / dense.latency_ms)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(labels, [1.0] * len(labels), color="#cccccc", label="dense")
    ax.bar(labels, ratios, width=0.5, color="#1f77b4", label="pruned")
    for i, r in enumerate(ratios):
        ax.text(i, r + 0.02, f"{r:.2f}x", ha="center", fontsize=9)
    ax.set_ylabel("relative to dense")
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_groups(coupling: Any, path: str | Path) -> Path:
    """The group structure: a node per coupled group (coloured by kind, hatched grey when not
    prunable) and an edge group -> target group per relation (a layer reading the group and
    writing the target); ``OUTPUT`` is the model's output. PNG or SVG by suffix."""
    import networkx as nx

    from surgery.graph.groups import OUTPUT

    plt = _pyplot()
    g = nx.DiGraph()
    for group in coupling.groups:
        g.add_node(group.id)
    g.add_node(OUTPUT)
    for rel in coupling.relations:
        if g.has_edge(rel.group, rel.target):
            g.edges[rel.group, rel.target]["layers"] += 1
        else:
            g.add_edge(rel.group, rel.target, layers=1)
    rank = {gr.id: i for i, gr in enumerate(sorted(coupling.groups, key=lambda x: (x.order, x.id)))}
    rank[OUTPUT] = len(rank)
    pos = {n: (rank[n], (rank[n] % 3 - 1) * 0.6 + (0.25 if rank[n] % 2 else 0.0)) for n in g.nodes}
    n = len(g.nodes)
    fig, ax = plt.subplots(figsize=(min(60, 2 + 0.9 * n), 4.5))
    by_id = {gr.id: gr for gr in coupling.groups}
    colors = [KIND_COLORS.get(by_id[v].kind, OTHER_COLOR) if v in by_id and by_id[v].prunable
              else "#dddddd" for v in g.nodes]
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=900, edgecolors="black")
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=12, node_size=900,
                           connectionstyle="arc3,rad=0.25", edge_color="#555555")
    labels = {v: ("output" if v == OUTPUT else f"{v}\n{by_id[v].atoms}") for v in g.nodes}
    nx.draw_networkx_labels(g, pos, labels, ax=ax, font_size=7)
    for v in by_id:
        x, y = pos[v]
        ax.text(x, y - 0.28, _short(by_id[v].name), ha="center", va="top", fontsize=6, rotation=30)
    from matplotlib.patches import Patch

    kinds = sorted({gr.kind for gr in coupling.groups if gr.prunable})
    handles = [Patch(color=KIND_COLORS.get(k, OTHER_COLOR), label=k) for k in kinds]
    handles.append(Patch(color="#dddddd", label="not prunable"))
    ax.legend(handles=handles, loc="upper left", fontsize=7)
    ax.set_title("coupled channel groups (id, atoms); edge: a layer reads the group and writes "
                 "the target group", fontsize=9)
    ax.set_ylim(-1.4, 1.2)
    ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


# ---- the report -----------------------------------------------------------------------------

def _fmt_int(v: int | None) -> str:
    return "n/a" if v is None else f"{v:,}"


def _ratio(a: float | None, b: float | None, fmt: str = "{:.2f}x") -> str:
    return fmt.format(b / a) if a and b is not None else ""


def summary_rows(dense: Measurement, pruned: Measurement) -> list[list[str]]:
    rows = [
        ["parameters", _fmt_int(dense.params), _fmt_int(pruned.params),
         _ratio(dense.params, pruned.params)],
        ["MACs / sample", _fmt_int(dense.macs), _fmt_int(pruned.macs),
         _ratio(dense.macs, pruned.macs)],
    ]
    if dense.accuracy is not None or pruned.accuracy is not None:
        da, pa = dense.accuracy, pruned.accuracy
        rows.append([f"accuracy ({pruned.samples or dense.samples} samples)",
                     "n/a" if da is None else f"{da:.4f}", "n/a" if pa is None else f"{pa:.4f}",
                     f"{pa - da:+.4f}" if da is not None and pa is not None else ""])
    if dense.latency_ms is not None or pruned.latency_ms is not None:
        dl, pl = dense.latency_ms, pruned.latency_ms
        rows.append([f"latency, batch {pruned.latency_batch or dense.latency_batch} (ms)",
                     "n/a" if dl is None else f"{dl:.2f}", "n/a" if pl is None else f"{pl:.2f}",
                     f"{dl / pl:.2f}x faster" if dl and pl else ""])
    return rows


def group_rows(plan: Any) -> list[list[str]]:
    return [[str(g.id), g.name, g.kind, str(g.atoms), str(len(g.kept)),
             f"{len(g.kept) / g.atoms:.0%}" if g.atoms else ""] for g in plan.groups]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(folder: str | Path, *, plan: Any, model: str, command: str,
                 dense: Measurement, pruned: Measurement, settings: dict[str, Any],
                 seconds: float | None = None, loads: str | None = None) -> list[Path]:
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
        intro += (f" {_count(plan.extra['compensated'])} layers reading a cut group refitted by "
                  "least squares.")
    loading = f"Loading: {loads}." if loads else None
    no_plots = "(No plots: pip install 'model-surgery[plots]' for matplotlib.)"
    cost_img = f"![params and MACs]({COST_PLOT})" if plots else no_plots
    kept_img = f"![kept per group]({KEPT_PLOT})" if plots else no_plots
    cost_tag = f"<img src='{COST_PLOT}' alt='params and MACs'>" if plots else f"<p>{no_plots}</p>"
    kept_tag = f"<img src='{KEPT_PLOT}' alt='kept per group'>" if plots else f"<p>{no_plots}</p>"

    md = [f"# {title}", "", intro, "", *([loading, ""] if loading else []),
          "## Before and after", "",
          _md_table(summary_header, summary_rows(dense, pruned)), "",
          cost_img, "", "## What was cut", "",
          _md_table(["kind", "atoms", "kept", "kept %"], kind_rows), "",
          kept_img, "", _md_table(groups_header, group_rows(plan)), "",
          "## Settings", "", _md_table(["setting", "value"], settings_rows), "",
          "## Reproduce", "", "```bash", command, "```", "",
          _md_table(["package", "version"], [[k, v] for k, v in vers.items()]), ""]
    (folder / "report.md").write_text("\n".join(md))

    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}td:nth-child(2),td:first-child{text-align:left}"
             "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{style}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>",
         *([f"<p>{html.escape(loading)}</p>"] if loading else []),
         "<h2>Before and after</h2>", _html_table(summary_header, summary_rows(dense, pruned)),
         cost_tag, "<h2>What was cut</h2>",
         _html_table(["kind", "atoms", "kept", "kept %"], kind_rows),
         kept_tag,
         _html_table(groups_header, group_rows(plan)),
         "<h2>Settings</h2>", _html_table(["setting", "value"], settings_rows),
         "<h2>Reproduce</h2>", f"<pre>{html.escape(command)}</pre>",
         _html_table(["package", "version"], [[k, v] for k, v in vers.items()]),
         "</body></html>"]
    (folder / "report.html").write_text("\n".join(h))
    (folder / "metrics.json").write_text(json.dumps(
        {"dense": asdict(dense), "pruned": asdict(pruned), "command": command,
         "versions": vers, "settings": settings, "seconds": seconds}, indent=1))
    names = ("report.md", "report.html", "metrics.json") + ((KEPT_PLOT, COST_PLOT) if plots else ())
    return [folder / n for n in names]


def _count(value: Any) -> int:
    return value if isinstance(value, int) else len(value) if hasattr(value, "__len__") else 0
