"""The latency budget's figure: what the device measured, what the model fitted, what came out.

A latency budget is only as good as its model of the device, so the report shows it whole:
per layer kind, the measured time at each uniform keep ratio (points) beside the model's fit
(lines), the whole model measured and modelled; the width sweeps that found the kernel's
preferred multiple (the cliffs); and the asked speedup beside the achieved one for every
attempt (the first, and the corrected one when the first missed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIND_COLORS = {"linear": "#1f77b4", "conv": "#1f77b4", "attention": "#ff7f0e",
               "norm": "#2ca02c", "elementwise": "#9467bd", "other": "#8c564b"}


def plot_latency_model(summary: dict[str, Any], path: str | Path,
                       title: str = "") -> Path:
    """Three panels from ``plan.extra["latency_model"]`` (see
    :meth:`surgery.budget.latency.LatencyModel.summary`), written to ``path``."""
    from surgery.cli.plots import _pyplot

    plt = _pyplot()
    cliffs = summary.get("cliffs") or {}
    attempts = summary.get("attempts") or []
    panels = 1 + bool(cliffs) + bool(attempts)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), layout="constrained",
                             squeeze=False)
    ax = axes[0][0]
    for kind, measured in sorted(summary["measured_ms"].items()):
        color = KIND_COLORS.get(kind, "#7f7f7f")
        ax.plot(summary["ratios"], measured, "o", color=color, ms=4)
        ax.plot(summary["grid"], summary["fit_ms"][kind], "-", color=color, lw=1,
                label=f"{kind} (nodes)")
    ax.plot(summary["ratios"], summary["end_to_end_ms"], "s", color="black", ms=4)
    ax.plot(summary["grid"], summary["total_ms"], "-", color="black", lw=1.5,
            label="whole model")
    ax.set_xlabel(f"uniform keep ratio (widths on multiples of {summary['multiple']})")
    ax.set_ylabel(f"ms per batch of {summary['batch']}")
    ax.set_title("measured (points) and fit (lines)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    col = 1
    if cliffs:
        ax = axes[0][col]
        col += 1
        for kind, c in sorted(cliffs.items()):
            color = KIND_COLORS.get(kind, "#7f7f7f")
            ax.plot(c["widths"], c["ms"], ".-", color=color, lw=0.8, label=kind)
            if c["multiple"] > 1:
                on = [(w, t) for w, t in zip(c["widths"], c["ms"]) if w % c["multiple"] == 0]
                ax.plot(*zip(*on), "o", mfc="none", color=color, ms=7,
                        label=f"{kind}: multiples of {c['multiple']} "
                              f"({c['penalty']:.0%} faster)")
        ax.set_xlabel("output width of the costliest layer")
        ax.set_ylabel("ms per call")
        ax.set_title("width sweeps (cliffs)", fontsize=9)
        ax.legend(fontsize=7)
    if attempts:
        ax = axes[0][col]
        asked = summary.get("asked", attempts[0].get("target"))
        labels = [f"try {i + 1}" for i in range(len(attempts))]
        x = list(range(len(attempts)))
        ax.bar([i - 0.2 for i in x], [a["modelled"] for a in attempts], 0.4,
               color="#aec7e8", label="modelled")
        achieved = [a.get("achieved") or 0.0 for a in attempts]
        ax.bar([i + 0.2 for i in x], achieved, 0.4, color="#1f77b4", label="measured")
        for i, a in enumerate(attempts):
            if a.get("quartiles"):
                lo, hi = a["quartiles"]
                ax.plot([i + 0.2, i + 0.2], [lo, hi], color="black", lw=1)
        ax.axhline(asked, color="#d62728", ls="--", lw=1, label=f"asked {asked:.2f}x")
        ax.axhspan(asked * 0.95, asked * 1.05, color="#d62728", alpha=0.08)
        ax.set_xticks(x, labels)
        ax.set_ylabel("speedup over dense (x)")
        ax.set_title("asked vs achieved", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_latency_model"]
