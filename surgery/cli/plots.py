"""The report's figures: the kept fraction per group and the pruned model's size and speed
relative to the dense one (matplotlib, the optional ``plots`` extra)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from surgery.counting import Measurement

KIND_COLORS = {"channel": "#1f77b4", "head": "#ff7f0e", "neuron": "#2ca02c", "hidden": "#d62728"}


OTHER_COLOR = "#7f7f7f"


BETTER_COLOR = "#1f77b4"  # pruned below the dense


WORSE_COLOR = "#d62728"  # pruned above the dense


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
                    textcoords="offset points", va="center", fontsize=7, bbox=LABEL_BOX)
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


LABEL_BOX = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}
"""A light box under text drawn over lines."""
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
