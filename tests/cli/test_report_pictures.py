"""The pictures of the report (``kept_per_group.png``, ``params_macs.png``), the HTML page, and
the group drawing of ``surgery inspect --graph``: every bar and value inside the picture, names
readable, no matplotlib warnings, and a many-group drawing that fits one screen."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from surgery.cli.group_graph import draw_groups  # noqa: E402
from surgery.cli.plots import plot_cost, plot_kept, short_name  # noqa: E402
from surgery.cli.report import write_report  # noqa: E402
from surgery.counting import Measurement  # noqa: E402
from surgery.cut.plan import GroupDecision, PruningPlan  # noqa: E402
from surgery.graph.groups import OUTPUT  # noqa: E402

SCREEN = (1600, 1000)
LONG_NAMES = [
    "bert.encoder.layer.0.attention.output.dense (+11)",
    "bert.encoder.layer.0.attention.self.query (+5)",
    "bert.encoder.layer.0.intermediate.dense",
    "model.backbone.stages.3.blocks.11.token_mixer.attention_projection_out (+7)",
    "head." * 40 + "fc",  # 200 characters: made tight_layout give up before
    "stem",
]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    """Every figure saved while the test runs (kept open to measure what was drawn)."""
    saved: list[Figure] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def render(fig: Figure):
    """Draw a saved (and closed) figure again on an Agg canvas; its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def extents(fig: Figure, texts) -> list:
    renderer = render(fig)
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def inside(box, outer, slack: float = 1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.y0 >= outer.y0 - slack
            and box.x1 <= outer.x1 + slack and box.y1 <= outer.y1 + slack)


def make_plan(names: list[str] = LONG_NAMES) -> PruningPlan:
    kinds = ["hidden", "head", "neuron", "channel"]
    groups = [GroupDecision(id=i, name=n, kind=kinds[i % 4], atoms=64 * (i + 1),
                            kept=list(range(10 * (i + 1)))) for i, n in enumerate(names)]
    return PruningPlan(fingerprint="f", criterion="mi", target="output",
                       budget={"kind": "params", "scope": ["bert.encoder"], "sparsity": 0.5,
                               "dense_params": 1000, "estimated_params": 500},
                       groups=groups, keep={}, shapes={})


# ---- the report -----------------------------------------------------------------------------

def test_write_report_emits_no_warnings(tmp_path: Path) -> None:
    dense = Measurement(1000, 2000, 0.9, 64, 10.0, 8)
    slower = Measurement(1300, 1000, 0.8, 64, 16.0, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(tmp_path, plan=make_plan(), model="m", command="surgery prune m",
                     dense=dense, pruned=slower, settings={"sparsity": 0.5})
    assert [str(w.message) for w in caught] == []
    for png in ("kept_per_group.png", "params_macs.png"):
        assert png_size(tmp_path / png)[0] > 0


def test_html_renders_code_spans(tmp_path: Path) -> None:
    write_report(tmp_path, plan=make_plan(), model="m", command="surgery prune m",
                 dense=Measurement(1000, 2000), pruned=Measurement(500, 900),
                 settings={"sparsity": 0.5})
    page = (tmp_path / "report.html").read_text()
    assert "`" not in page
    assert "Pruned by <code>mi</code> (target <code>output</code>)" in page
    assert "<code>bert.encoder</code>" in page
    md = (tmp_path / "report.md").read_text()
    assert "Pruned by `mi` (target `output`)" in md  # Markdown keeps its code spans


def test_fallbacks_are_in_the_report(tmp_path: Path) -> None:
    plan = make_plan()
    plan.extra["fallbacks"] = {"blocks.0.attn.qkv": "mi -> magnitude: no layer with weights is "
                                                    "seen reading this group"}
    write_report(tmp_path, plan=plan, model="m", command="c", dense=Measurement(1, 1),
                 pruned=Measurement(1, 1), settings={})
    md = (tmp_path / "report.md").read_text()
    assert "1 group(s) could not be scored as asked: `blocks.0.attn.qkv`: mi -> magnitude" in md


def test_norm_gains_are_in_the_report(tmp_path: Path) -> None:
    plan = make_plan()
    plan.extra["compensated"] = ["a", "b"]
    plan.extra["norm_gains"] = {"blocks.0.norm1": 1.012, "norm": 1.071}
    write_report(tmp_path, plan=plan, model="m", command="c", dense=Measurement(1, 1),
                 pruned=Measurement(1, 1), settings={})
    md = (tmp_path / "report.md").read_text()
    assert "2 norms across cut hidden dims rescaled by one gain each (1.012 to 1.071)" in md


def test_html_code_spans_are_escaped(tmp_path: Path) -> None:
    plan = make_plan()
    plan.criterion = "<b>&"
    write_report(tmp_path, plan=plan, model="m", command="c", dense=Measurement(1, 1),
                 pruned=Measurement(1, 1), settings={})
    page = (tmp_path / "report.html").read_text()
    assert "<code>&lt;b&gt;&amp;</code>" in page and "<b>&" not in page


# ---- params_macs.png ------------------------------------------------------------------------

@pytest.mark.parametrize("pruned", [Measurement(1300, 1000, latency_ms=16.0, latency_batch=8),
                                    Measurement(400, 900, latency_ms=31.0, latency_batch=8),
                                    Measurement(500, 1000)])
def test_plot_cost_fits_and_labels_every_bar(tmp_path: Path, figures: list, pruned) -> None:
    dense = Measurement(1000, 2000, latency_ms=10.0, latency_batch=8)
    ratios = [pruned.params / dense.params, pruned.macs / dense.macs]
    if pruned.latency_ms:
        ratios.append(pruned.latency_ms / dense.latency_ms)
    plot_cost(dense, pruned, tmp_path / "cost.png")
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_ylim()[1] > max(ratios)  # no bar clipped
    texts = [t.get_text() for t in ax.texts]
    for r in ratios:  # every value written out
        assert any(f"{r:.2f}x" in t for t in texts), (r, texts)
    words = " ".join(texts)
    if ratios[0] > 1:
        assert "bigger" in words
    if len(ratios) == 3:
        assert ("slower" if ratios[2] > 1 else "faster") in words
    for box in extents(fig, ax.texts):  # and inside the picture
        assert inside(box, fig.bbox)


# ---- kept_per_group.png ---------------------------------------------------------------------

def test_short_name_keeps_the_distinctive_tail() -> None:
    assert short_name("layer1.0.conv1", 40) == "layer1.0.conv1"
    got = short_name("bert.encoder.layer.0.attention.self.query (+5)", 36)
    assert got == "…layer.0.attention.self.query (+5)"
    got = short_name("model.backbone.stages.3.blocks.11.token_mixer.attention_projection_out", 40)
    assert got.endswith("attention_projection_out") and "blocks.11" in got and len(got) <= 40
    got = short_name("a." * 50 + "b" * 60, 30)
    assert len(got) <= 30 and got.endswith("b" * 10)
    for name in LONG_NAMES:
        for width in (20, 30, 40):
            assert len(short_name(name, width)) <= width


def test_plot_kept_names_are_readable_and_inside(tmp_path: Path, figures: list) -> None:
    plot_kept(make_plan(), tmp_path / "kept.png")
    (fig,) = figures
    ax = fig.axes[0]
    labels = ax.get_yticklabels()
    texts = [t.get_text() for t in labels]
    assert "0: …encoder.layer.0.attention.output.dense (+11)" in texts
    assert "3: …blocks.11…attention_projection_out (+7)" in texts
    assert "1: bert.encoder.layer.0.attention.self.query (+5)" in texts
    assert "5: stem" in texts
    for box in extents(fig, [*labels, *ax.texts, ax.title, fig._suptitle or ax.title]):
        assert inside(box, fig.bbox)
    legend = ax.get_legend() or fig.legends[0]
    renderer = render(fig)
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(p.get_window_extent(renderer)) for p in ax.patches)


# ---- the group drawing ----------------------------------------------------------------------

def fake_coupling(stages: tuple[int, ...] = (3, 4, 11, 3)) -> SimpleNamespace:
    """A ResNet-like group structure: a 3-conv stem, per stage a residual group (the hub) read
    by each block's first conv and written by its last, and an output group: 40 groups for
    ResNet-50's (3, 4, 6, 3) blocks, 50 for (3, 4, 11, 3)."""
    groups, relations = [], []

    def group(name: str, atoms: int, prunable: bool = True, kind: str = "channel") -> int:
        gid = len(groups)
        groups.append(SimpleNamespace(id=gid, name=name, atoms=atoms, prunable=prunable,
                                      kind=kind, order=gid, reason=""))
        return gid

    def edge(a: int, b: int) -> None:
        relations.append(SimpleNamespace(group=a, target=b))

    prev = group("model.stem.conv1.0", 32)
    for i in (1, 2):
        g = group(f"model.stem.conv1.{3 * i}", 32)
        edge(prev, g)
        prev = g
    for s, blocks in enumerate(stages):
        hub = None
        for b in range(blocks):
            c1 = group(f"model.backbone.layer{s + 1}.{b}.conv1", 64 << s)
            c2 = group(f"model.backbone.layer{s + 1}.{b}.conv2", 64 << s)
            if hub is None:
                hub = group(f"model.backbone.layer{s + 1}.0.conv3 (+{blocks})", 256 << s)
                edge(prev, hub)
            edge(prev if b == 0 else hub, c1)
            edge(c1, c2)
            edge(c2, hub)
        prev = hub
    edge(prev, OUTPUT)
    out = group("model.head.fc", 1000, prunable=False)
    return SimpleNamespace(groups=groups, relations=relations, output_groups={out})


def check_drawing(fig: Figure) -> None:
    ax = fig.axes[0]
    renderer = render(fig)
    texts = [t for t in ax.texts if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for box in boxes:
        assert inside(box, fig.bbox)
    for t in texts:
        assert t.get_fontsize() >= 7, t.get_text()
    names = [(t, b) for t, b in zip(texts, boxes) if t.get_gid() == "name"]
    assert names
    for i, (t1, b1) in enumerate(names):  # no name written over another
        for t2, b2 in names[i + 1:]:
            assert not b1.overlaps(b2), (t1.get_text(), t2.get_text())
    nodes = ax.collections[0]
    centres = ax.transData.transform(nodes.get_offsets())
    radius = np.sqrt(nodes.get_sizes().max()) / 2 * fig.dpi / 72
    for legend in [*fig.legends, ax.get_legend()]:
        if legend is None:
            continue
        box = legend.get_window_extent(renderer).padded(radius)
        assert not any(box.contains(x, y) for x, y in centres)


def test_draw_groups_of_fifty_groups_fits_a_screen(tmp_path: Path, figures: list) -> None:
    coupling = fake_coupling()
    assert len(coupling.groups) == 50
    draw_groups(coupling, tmp_path / "g.png")
    width, height = png_size(tmp_path / "g.png")
    assert width <= SCREEN[0] and height <= SCREEN[1], (width, height)
    check_drawing(figures[0])


def test_draw_groups_of_a_small_model(tmp_path: Path, figures: list) -> None:
    draw_groups(fake_coupling((1, 1)), tmp_path / "g.png")
    width, height = png_size(tmp_path / "g.png")
    assert 400 <= width <= SCREEN[0] and 200 <= height <= SCREEN[1]
    check_drawing(figures[0])


def test_draw_groups_without_warnings(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw_groups(fake_coupling((3, 4, 23, 3)), tmp_path / "g.svg")
        draw_groups(fake_coupling((1,)), tmp_path / "g.png")
    assert [str(w.message) for w in caught] == []
    assert "<svg" in (tmp_path / "g.svg").read_text()


def test_draw_groups_of_torchvision_efficientnet(tmp_path: Path, figures: list) -> None:
    """A real 50-group model (squeeze-excitation blocks): one screen, nothing overlapping."""
    torchvision = pytest.importorskip("torchvision")
    import surgery

    coupling = surgery.couple(torchvision.models.efficientnet_b0().eval(),
                              torch.randn(1, 3, 32, 32))
    assert len(coupling.groups) >= 45
    draw_groups(coupling, tmp_path / "g.png")
    width, height = png_size(tmp_path / "g.png")
    assert width <= SCREEN[0] and height <= SCREEN[1], (width, height)
    check_drawing(figures[0])
