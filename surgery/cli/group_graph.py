"""``surgery inspect --graph``: the coupled groups drawn as a graph that fits one screen: groups
in layers left to right (residual cycles broken by a depth-first search), wrapped into bands
that cut the fewest edges."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from surgery.cli.plots import KIND_COLORS, LABEL_BOX, OTHER_COLOR, _pyplot, short_name

GRAPH_CELL = (1.3, 0.8)  # inches a node takes: a column's width, a row's height


GRAPH_MAX_WIDTH = 15.5  # inches (1550 px at 100 dpi): more columns wrap into another band


GRAPH_MAX_HEIGHT = 10.0  # inches


GRAPH_MIN_ROW = 0.7  # inches: rows come closer to fit the height


GRAPH_MAX_ROWS = 11  # nodes stacked in one column before it splits (fewer to fit the height)


# a name written over an edge stays legible


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
                    fontsize=7.5, color="#444444", gid="jump", bbox=LABEL_BOX)
    for v in dict.fromkeys(w for _, w in jumps):
        ax.annotate(_ids([u for u, w in jumps if w == v], OUTPUT) + " →", pos[v],
                    xytext=(-14, 9), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7.5, color="#444444", gid="jump", bbox=LABEL_BOX)
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
                    linespacing=1.1, gid="name", bbox=LABEL_BOX)
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
