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
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

from surgery.counting import Measurement
from surgery.timing import Speedup

KIND_COLORS = {"channel": "#1f77b4", "head": "#ff7f0e", "neuron": "#2ca02c", "hidden": "#d62728"}
OTHER_COLOR = "#7f7f7f"
BETTER_COLOR, WORSE_COLOR = "#1f77b4", "#d62728"  # pruned below / above the dense
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
    """Horizontal bars: kept fraction per prunable group, coloured by kind. Group names are
    shortened to their distinctive tail (:func:`short_name`) and the figure sized for them."""
    plt = _pyplot()
    groups = list(plan.groups)
    n = max(1, len(groups))
    names = [f"{g.id}: {short_name(g.name, KEPT_NAME_WIDTH)}" for g in groups]
    widest = max((len(s) for s in names), default=10)
    # about 0.06 in a character at 7.5 pt, 4.8 in for the bars, counts and legend
    fig, ax = plt.subplots(figsize=(4.8 + 0.06 * widest, 1.5 + 0.24 * n), layout="constrained")
    fractions = [len(g.kept) / g.atoms if g.atoms else 1.0 for g in groups]
    colors = [KIND_COLORS.get(g.kind, OTHER_COLOR) for g in groups]
    y = list(range(len(groups)))
    ax.barh(y, fractions, color=colors)
    ax.axvline(1.0, color="#888888", lw=0.8, ls="--")
    for yi, g, f in zip(y, groups, fractions):
        ax.annotate(f"{len(g.kept)}/{g.atoms}", (min(f, 1.0), yi), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7, bbox=_UNDER)
    ax.set_yticks(y, names, fontsize=7.5)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first group on top
    ax.set_xlim(0, 1.25)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("kept fraction of the group's atoms")
    kind = plan.budget.get("kind", "?")
    kinds = list(dict.fromkeys(g.kind for g in groups))
    from matplotlib.patches import Patch

    fig.suptitle(f"kept per coupled group ({plan.criterion}, {kind} budget)", fontsize=10)
    ax.legend(handles=[Patch(color=KIND_COLORS.get(k, OTHER_COLOR), label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=max(1, len(kinds)),
              fontsize=8, frameon=False, borderaxespad=0.2)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


KEPT_NAME_WIDTH = 48  # characters of a group name on the kept chart (the table has them all)
_EXTRA = re.compile(r"^(.*?)((?: \(\+\d+\))?)$", re.S)


def short_name(name: str, width: int = 40) -> str:
    """``name`` in at most ``width`` characters, keeping what tells groups apart: the leaf
    module, the last indexed container (``layer.0``, ``blocks.11``) and the ``(+N)`` of a
    coupled group, then as much of the path before the leaf as fits; "…" marks what was left
    out. ``bert.encoder.layer.0.attention.self.query (+5)`` in 36 characters is
    ``…layer.0.attention.self.query (+5)``."""
    if len(name) <= width:
        return name
    path, extra = _EXTRA.match(name).groups()
    parts = path.split(".")
    room = width - len(extra)

    def render(keep: set[int]) -> str:
        out, last = "", -1
        for i in sorted(keep):
            out += ("" if i == 0 else "…") if i != last + 1 else ("." if out else "")
            out += parts[i]
            last = i
        return out

    keep = {len(parts) - 1}
    digits = [i for i in range(len(parts) - 1) if parts[i].isdigit()]
    if digits:  # the last run of indices and the container it indexes: layer.0, blocks.5.2
        i = digits[-1]
        while i > 0 and parts[i - 1].isdigit():
            i -= 1
        anchor = set(range(max(0, i - 1), digits[-1] + 1))
        if len(render(keep | anchor)) <= room:
            keep |= anchor
    for i in range(len(parts) - 2, -1, -1):  # the path before the leaf, while it fits
        if i not in keep:
            if len(render(keep | {i})) > room:
                break
            keep.add(i)
    text = render(keep)
    if len(text) > room:  # one long leaf: its end
        text = "…" + path[-(room - 1):] if room > 1 else ""
    return (text + extra)[:width] if text else name[-width:]


def plot_cost(dense: Measurement, pruned: Measurement, path: str | Path) -> Path:
    """Params, MACs (and latency when measured) of the pruned model relative to the dense.

    The axis fits every bar, each labelled with its ratio and what it means (smaller, fewer,
    faster; a ratio above 1 is drawn red and labelled bigger, more, slower)."""
    plt = _pyplot()
    labels = ["params", "MACs"]
    ratios = [pruned.params / dense.params if dense.params else 1.0,
              pruned.macs / dense.macs if dense.macs else 1.0]
    if dense.latency_ms and pruned.latency_ms:
        labels.append(f"latency\n(batch {pruned.latency_batch})")
        ratios.append(pruned.latency_ms / dense.latency_ms)
    worse = [r > 1 + _SAME for r in ratios]
    fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    x = list(range(len(labels)))
    ax.bar(x, [1.0] * len(x), color="#cccccc")
    ax.bar(x, ratios, width=0.5, color=[WORSE_COLOR if w else BETTER_COLOR for w in worse])
    ax.axhline(1.0, color="#888888", lw=0.8, ls="--")
    for i, (what, r) in enumerate(zip(labels, ratios)):
        ax.annotate(f"{r:.2f}x\n({_meaning(what, r)})", (i, r), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8.5)
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylim(0, max(1.0, *ratios) * 1.32)  # room for the two-line label of the top bar
    ax.set_ylabel("pruned / dense")
    ax.set_title("the pruned model relative to the dense", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color="#cccccc", label="dense (= 1)"),
               Patch(color=BETTER_COLOR, label="pruned: smaller,\nfewer, faster")]
    if any(worse):
        handles.append(Patch(color=WORSE_COLOR, label="pruned: bigger,\nmore, slower"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SAME = 0.005  # ratios within half a percent of 1 read "same"


def _meaning(what: str, ratio: float) -> str:
    """What a pruned/dense ratio means for ``what`` (params, MACs, latency ...)."""
    if abs(ratio - 1) <= _SAME:
        return "same"
    if what.startswith("latency"):
        return f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"
    if what == "MACs":
        return "fewer" if ratio < 1 else "more"
    return "smaller" if ratio < 1 else "bigger"


GRAPH_CELL = (1.3, 0.8)  # inches a node takes: a column's width, a row's height
GRAPH_MAX_WIDTH = 15.5  # inches (1550 px at 100 dpi): more columns wrap into another band
GRAPH_MAX_HEIGHT, GRAPH_MIN_ROW = 10.0, 0.7  # inches: rows come closer to fit the height
GRAPH_MAX_ROWS = 11  # nodes stacked in one column before it splits (fewer to fit the height)
# a name written over an edge stays legible
_UNDER = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}


def draw_groups(coupling: Any, path: str | Path) -> Path:
    """The group structure: a node per coupled group (coloured by kind, grey when not prunable)
    and an arrow group -> target group per relation (a layer reading the group and writing
    the target); ``output`` is the model's output. PNG, SVG or PDF by suffix.

    Laid out left to right in layers (:func:`_graph_columns`: a group right of the groups it
    is computed from, a residual group left of the blocks that read and write it), the layers
    wrapped into bands stacked top-down so that a 50-group model fits one screen (about
    1550 x 1000 px) with every name legible."""
    import networkx as nx
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

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
    by_id = {gr.id: gr for gr in coupling.groups}
    rank = {gr.id: i for i, gr in enumerate(sorted(coupling.groups, key=lambda x: (x.order, x.id)))}
    rank[OUTPUT] = len(rank)
    outputs = [v for v in getattr(coupling, "output_groups", ()) if v in by_id and not g.degree(v)]
    columns, back = _graph_columns(g, rank, OUTPUT, outputs)
    # columns taller than ``rows`` split in two or more: the most rows that fit the height
    fits = (GRAPH_MAX_HEIGHT - 0.9) / GRAPH_MIN_ROW
    layouts = []
    for rows in range(GRAPH_MAX_ROWS, 2, -1):
        layouts.append(_graph_bands(g, columns, rows))
        if layouts[-1][3] <= fits:
            break
    pos, band_of, widest, height = min(layouts, key=lambda lay: (lay[3] > fits, lay[3]))

    cell_w, cell_h = GRAPH_CELL  # rows closer (down to GRAPH_MIN_ROW) to fit the height
    cell_h = max(GRAPH_MIN_ROW, min(cell_h, (GRAPH_MAX_HEIGHT - 0.9) / max(height, 1.0)))
    fig, ax = plt.subplots(figsize=(max(7.6, widest * cell_w + 0.4), height * cell_h + 0.9),
                           layout="constrained")
    colors = [KIND_COLORS.get(by_id[v].kind, OTHER_COLOR) if v in by_id and by_id[v].prunable
              else "#dddddd" for v in g.nodes]
    size = 700
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=size, edgecolors="black",
                           linewidths=0.8)
    kinds: dict[str, list] = {"next": [], "skip": [], "back": []}
    jumps: list[tuple] = []  # edges between bands: written as "-> v" at u and "u ->" at v
    loops = {u for u, v in g.edges if u == v}  # depthwise: "↻" by the id, not a big loop
    for u, v in g.edges:
        if u == v:
            continue
        if band_of[u] != band_of[v]:
            jumps.append((u, v))
        elif (u, v) in back or pos[v][0] <= pos[u][0]:
            kinds["back"].append((u, v))
        else:
            kinds["next" if pos[v][0] - pos[u][0] <= 1 else "skip"].append((u, v))
    curve = {"next": "arc3,rad=0.0", "skip": "arc3,rad=-0.2", "back": "arc3,rad=0.3"}
    for kind, edges in kinds.items():
        if edges:
            nx.draw_networkx_edges(g, pos, edgelist=edges, ax=ax, arrows=True, arrowsize=10,
                                   node_size=size, connectionstyle=curve[kind],
                                   edge_color="#555555", width=[
                                       min(2.5, 0.6 + 0.4 * g.edges[e]["layers"]) for e in edges])
    for v in dict.fromkeys(u for u, _ in jumps):
        ax.annotate("→ " + _ids([w for u, w in jumps if u == v], OUTPUT), pos[v],
                    xytext=(14, 9), textcoords="offset points", ha="left", va="bottom",
                    fontsize=7.5, color="#444444", gid="jump", bbox=_UNDER)
    for v in dict.fromkeys(w for _, w in jumps):
        ax.annotate(_ids([u for u, w in jumps if w == v], OUTPUT) + " →", pos[v],
                    xytext=(-14, 9), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7.5, color="#444444", gid="jump", bbox=_UNDER)
    for v in outputs:  # the groups that are the model's output: a dotted line to it
        (x0, y0), (x1, y1) = pos[v], pos[OUTPUT]
        ax.plot([x0, x1], [y0, y1], ls=":", color="#777777", lw=1, zorder=0)
    labels = {v: ("output" if v == OUTPUT else
                  f"{v}{'↻' if v in loops else ''}\n{by_id[v].atoms}") for v in g.nodes}
    texts = nx.draw_networkx_labels(g, pos, labels, ax=ax, font_size=7)
    for t in texts.values():
        t.set_gid("node")
    for v in by_id:
        ax.annotate(_graph_name(by_id[v].name), pos[v], xytext=(0, -15),
                    textcoords="offset points", ha="center", va="top", fontsize=7.5,
                    linespacing=1.1, gid="name", bbox=_UNDER)
    kinds_used = sorted({gr.kind for gr in coupling.groups if gr.prunable})
    handles: list[Any] = [Patch(color=KIND_COLORS.get(k, OTHER_COLOR), label=k)
                          for k in kinds_used]
    handles.append(Patch(facecolor="#dddddd", edgecolor="black", lw=0.6, label="not prunable"))
    if outputs:
        handles.append(Line2D([], [], color="#777777", ls=":", label="is the model output"))
    if loops:
        handles.append(Line2D([], [], ls="none", marker=r"$n\circlearrowright$", markersize=14,
                              color="black", label="a layer reads and writes group n"))
    if jumps:
        handles.append(Line2D([], [], ls="none", marker=r"$\rightarrow n$", markersize=14,
                              color="#444444", label="arrow to group n in another band"))
    wide = sum(0.6 + 0.065 * len(h.get_label()) for h in handles)  # inches in one row
    rows = 1 if wide <= fig.get_figwidth() - 0.3 else 2
    fig.set_figheight(fig.get_figheight() + 0.2 * (rows - 1))
    fig.legend(handles=handles, loc="outside lower center", ncols=-(-len(handles) // rows),
               fontsize=8, frameon=False)
    fig.suptitle("coupled channel groups (id and atoms in each node); an arrow: a layer reads "
                 "the group and writes the target group", fontsize=9)
    xs = [x for x, _ in pos.values()]
    ys = [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 0.55, max(xs) + 0.55)
    ax.set_ylim(min(ys) - 0.65, max(ys) + 0.35)
    ax.axis("off")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _graph_columns(g: Any, rank: dict, output: Any,
                   outputs: Collection = ()) -> tuple[list[list], set]:
    """The layers of the drawing, left to right, and the edges drawn backwards.

    A depth-first search from the groups nothing writes into (then from the group read by the
    most, for a structure with no start: a transformer's hidden group) marks the edges that
    close a cycle, e.g. a ResNet block's last conv writing back the residual group its first
    conv reads; without them the graph is acyclic and a group's layer is its longest path
    from a start. ``output`` and the groups with no relation stand last (first the output,
    then ``outputs``, the groups that are the model's output); within a layer the groups sit
    near the mean place of their inputs (barycentre), ties by graph order."""
    import networkx as nx

    succ = {v: sorted(g.successors(v), key=rank.get) for v in g}
    state = dict.fromkeys(g, 0)  # 0 unseen, 1 on the search path, 2 done
    back: set = set()

    def search(root: Any) -> None:
        state[root] = 1
        stack = [(root, iter(succ[root]))]
        while stack:
            v, following = stack[-1]
            for w in following:
                if state[w] == 1:
                    back.add((v, w))
                elif state[w] == 0:
                    state[w] = 1
                    stack.append((w, iter(succ[w])))
                    break
            else:
                state[v] = 2
                stack.pop()

    order = sorted(g, key=rank.get)
    for v in order:
        if state[v] == 0 and g.in_degree(v) == 0 and g.out_degree(v):
            search(v)
    while left := [v for v in order if state[v] == 0 and g.degree(v)]:
        search(max(left, key=lambda v: (g.out_degree(v), -rank[v])))
    dag = nx.DiGraph()
    dag.add_nodes_from(g)
    dag.add_edges_from(e for e in g.edges if e not in back and e[0] != e[1])
    layer: dict = {}
    for v in nx.topological_sort(dag):
        layer[v] = max((layer[u] + 1 for u in dag.predecessors(v)), default=0)
    last = max([layer[v] + 1 for v in g if v != output and g.degree(v)] + [layer[output]])
    for v in g:
        if v == output or not g.degree(v):
            layer[v] = last
    columns: list[list] = [[] for _ in range(last + 1)]
    for v in order:
        columns[layer[v]].append(v)
    place: dict = {}
    for column in columns:
        def barycentre(v: Any) -> tuple:
            if v == output or not g.degree(v):  # last: the output, then its own groups
                return (2, v != output, v not in outputs, rank[v])
            seen = [place[u] for u in g.predecessors(v) if u in place and (u, v) not in back]
            return (0, sum(seen) / len(seen), 0, rank[v]) if seen else (1, 0.0, 0, rank[v])

        column.sort(key=barycentre)
        for i, v in enumerate(column):
            place[v] = i - (len(column) - 1) / 2
    return [c for c in columns if c], back


def _graph_bands(g: Any, columns: list[list], most: int) -> tuple[dict, dict, int, float]:
    """Positions (x: column in its band, y: row, top-down) of the columns split where taller
    than ``most`` and wrapped into bands no wider than GRAPH_MAX_WIDTH, the band breaks
    chosen to cut the fewest edges (then to make the bands even); the band of each node, the
    widest band's columns and the height in rows."""
    split: list[list] = []
    for column in columns:
        parts = -(-len(column) // most)
        step = -(-len(column) // parts)
        split += [column[i:i + step] for i in range(0, len(column), step)]
    m = len(split)
    col = {v: i for i, c in enumerate(split) for v in c}
    per_band = max(1, int(GRAPH_MAX_WIDTH // GRAPH_CELL[0]))
    bands = -(-m // per_band)
    cut = [0] * (m + 1)  # cut[i]: edges crossing the break before column i
    for u, v in g.edges:
        for i in range(min(col[u], col[v]) + 1, max(col[u], col[v]) + 1):
            cut[i] += 1
    # best[b][i]: (rows + cut edges, breaks) of the first i columns in b bands
    inf = (float("inf"), ())
    best = [[inf] * (m + 1) for _ in range(bands + 1)]
    best[0][0] = (0, ())
    for b in range(1, bands + 1):
        for i in range(1, m + 1):
            for j in range(max(0, i - per_band), i):
                cost, breaks = best[b - 1][j]
                if cost == inf[0]:
                    continue
                rows = max(len(c) for c in split[j:i])
                even = 0.01 * (per_band - (i - j)) ** 2  # ties: bands of even widths
                total = cost + rows + (cut[j] if j else 0) + even
                if total < best[b][i][0]:
                    best[b][i] = (total, (*breaks, j))
    starts = [*best[bands][m][1], m]
    pos: dict = {}
    band_of: dict = {}
    top, gap, widest = 0.0, 0.7, 1
    for b in range(bands):
        chunk = split[starts[b]:starts[b + 1]]
        rows = max(len(c) for c in chunk)
        widest = max(widest, len(chunk))
        for x, c in enumerate(chunk):
            for k, v in enumerate(c):
                pos[v] = (float(x), -(top + (rows - len(c)) / 2 + k))
                band_of[v] = b
        top += rows + gap
    return pos, band_of, widest, top - gap


def _ids(ids: list, output: Any, most: int = 3) -> str:
    """Group ids for a label: at most ``most``, then how many more."""
    names = ["output" if v == output else str(v) for v in ids]
    return ", ".join(names[:most]) + (f" +{len(names) - most}" if len(names) > most else "")


def _graph_name(name: str, line: int = 20) -> str:
    """A group's name under its node: shortened (:func:`short_name`) to fit two lines of
    ``line`` characters, broken after a dot."""
    for width in (2 * line, 34, 30, 26, line):
        lines = _two_lines(short_name(name, width), line)
        if lines:
            return "\n".join(lines)
    return short_name(name, line)


def _two_lines(text: str, width: int) -> list[str] | None:
    """``text`` on one or two lines of at most ``width`` characters, broken after a dot or
    "…" (not between a container and its index: ``layer.0.``) or before " (+N)", the lines
    as even as they can be; None when it does not fit."""
    if len(text) <= width:
        return [text]
    pieces = re.split(r"(?<=[.…])(?!\d)|(?= \()", text)
    best = None
    for k in range(1, len(pieces)):
        first, second = "".join(pieces[:k]), "".join(pieces[k:]).strip()
        if len(first) <= width and len(second) <= width and first and second:
            if best is None or max(map(len, best)) > max(len(first), len(second)):
                best = [first, second]
    return best


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
    if dense.latency_ms is not None or pruned.latency_ms is not None:
        dl, pl = dense.latency_ms, pruned.latency_ms
        change = speedup.text() if speedup is not None else (
            Speedup(dl / pl, dl / pl, dl / pl, 1).text() if dl and pl else "")
        rows.append([f"latency, batch {pruned.latency_batch or dense.latency_batch} (ms, "
                     "median)", "n/a" if dl is None else f"{dl:.2f}",
                     "n/a" if pl is None else f"{pl:.2f}", change])
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
                 seconds: float | None = None, speedup: Speedup | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html``, the plots and ``metrics.json`` into ``folder``."""
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
    no_plots = "(No plots: pip install 'model-surgery[plots]' for matplotlib.)"
    cost_img = f"![params and MACs]({COST_PLOT})" if plots else no_plots
    kept_img = f"![kept per group]({KEPT_PLOT})" if plots else no_plots
    cost_tag = f"<img src='{COST_PLOT}' alt='params and MACs'>" if plots else f"<p>{no_plots}</p>"
    kept_tag = f"<img src='{KEPT_PLOT}' alt='kept per group'>" if plots else f"<p>{no_plots}</p>"

    md = [f"# {title}", "", intro, "", "## Before and after", "",
          _md_table(summary_header, summary_rows(dense, pruned, speedup)), "",
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
             "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}"
             "code{background:#f4f4f4;padding:0 3px;border-radius:3px}")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{style}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>", f"<p>{_inline_html(intro)}</p>",
         "<h2>Before and after</h2>",
         _html_table(summary_header, summary_rows(dense, pruned, speedup)),
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
        {"dense": asdict(dense), "pruned": asdict(pruned),
         "speedup": asdict(speedup) if speedup is not None else None, "command": command,
         "versions": vers, "settings": settings, "seconds": seconds}, indent=1))
    names = ("report.md", "report.html", "metrics.json") + ((KEPT_PLOT, COST_PLOT) if plots else ())
    return [folder / n for n in names]


def _count(value: Any) -> int:
    return value if isinstance(value, int) else len(value) if hasattr(value, "__len__") else 0
