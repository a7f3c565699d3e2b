"""Random architectures for property tests: a hypothesis strategy and a builder.

An architecture is a plain, printable :class:`Arch` (so a falsifying example reads as a model
description) built into an ``nn.Module`` by :func:`build`. Two families:

* ``conv``: an image trunk of blocks (plain / grouped / depthwise convs, residual blocks with
  identity or projection shortcuts, concatenations of branches, optionally DenseNet-style with
  the input in the concat, squeeze-excitation gates, ConvNeXt blocks with a channels-last
  LayerNorm, U-Net skips through max-pool and upsampling), each with BatchNorm, GroupNorm or no
  norm; then optionally tokens (``flatten(2).transpose(1, 2)``) through self-attention blocks
  (plain torch: q/k/v ``Linear``, ``view(B, T, H, D)`` with sizes read from ``x.shape``,
  ``F.scaled_dot_product_attention``, output ``Linear``, residual add), MLP and gated-MLP
  blocks, 1-D convolutions over the sequence, a class token, a position table, linear layers
  and LayerNorms; then pooling and a linear head stack.
* ``tokens``: the token blocks straight on a raw ``(batch, TOKENS, features)`` input.
* ``mlp``: a linear stack on flat features with BatchNorm1d / LayerNorm / no norm.

Weights come from ``torch.manual_seed(arch.seed)``; every norm gets random affine parameters
and BatchNorms random running statistics, so a norm sliced at the wrong positions shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

WIDTHS = (4, 6, 8, 12)
NORMS_2D = ("bn", "gn", "none")
NORMS_1D = ("bn", "ln", "none")
IMAGE = 8
TOKENS = 5
BATCH = 2


@dataclass(frozen=True)
class Arch:
    """A random architecture: ``blocks`` are tuples ``(kind, *options)``; see :func:`build`."""

    family: str  # "conv" | "tokens" | "mlp"
    in_features: int  # image channels, token features, or flat features
    blocks: tuple[tuple, ...]  # conv trunk (conv family only)
    tokens: tuple[tuple, ...]  # token blocks (after the trunk for the conv family)
    head: tuple[tuple[int, str], ...]  # hidden (width, norm) of the final linear stack
    n_out: int
    seed: int

    def example_input(self, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if self.family == "mlp":
            return torch.randn(batch, self.in_features, generator=gen)
        if self.family == "tokens":
            return torch.randn(batch, TOKENS, self.in_features, generator=gen)
        return torch.randn(batch, self.in_features, IMAGE, IMAGE, generator=gen)


# ---- blocks ---------------------------------------------------------------------------------


def norm2d(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(next(g for g in (4, 3, 2, 1) if c % g == 0), c)
    return nn.Identity()


def norm1d(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(c)
    if kind == "ln":
        return nn.LayerNorm(c)
    return nn.Identity()


class ConvBNAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, groups: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=norm == "none")
        self.norm = norm2d(norm, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class Residual(nn.Module):
    """conv3x3 -> norm -> relu -> conv3x3 -> norm, plus identity or a 1x1 projection."""

    def __init__(self, c_in: int, mid: int, c_out: int, norm: str, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, padding=1, bias=False)
        self.norm1 = norm2d(norm, mid)
        self.conv2 = nn.Conv2d(mid, c_out, 3, padding=1, bias=False)
        self.norm2 = norm2d(norm, c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), norm2d(norm, c_out))
            if project or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class Concat(nn.Module):
    """Two branches concatenated on channels (1x1 and 3x3), optionally with the input first."""

    def __init__(self, c_in: int, a: int, b: int, dense: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(c_in, a, 1)
        self.b = nn.Conv2d(c_in, b, 3, padding=1)
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.relu(self.a(x)), F.relu(self.b(x))]
        return torch.cat([x, *parts] if self.dense else parts, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * g[:, :, None, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise 3x3, channels-last LayerNorm and MLP (``permute``), residual add."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class UNetSkip(nn.Module):
    """Max-pool down, conv, upsample back, concatenate with the input (a U-Net skip)."""

    def __init__(self, c: int, mid: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, mid, 3, padding=1, bias=False)
        self.norm = norm2d(norm, mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm(self.conv(F.max_pool2d(x, 2))))
        return torch.cat([x, F.interpolate(y, scale_factor=2.0, mode="nearest")], dim=1)


class TokenConv(nn.Module):
    """A 1-D convolution over the sequence (``transpose`` to channels-first and back),
    depthwise or full, with a residual add."""

    def __init__(self, d: int, depthwise: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=d if depthwise else 1)
        self.norm = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv(x.transpose(1, 2))).transpose(1, 2)


class ToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual add. The head count in the
    ``view`` is ``heads``: ``"shape"`` computes it from ``t.shape`` (adapts to pruning), ``"-1"``
    lets view infer it, ``"literal"`` writes the Python int (the engine must not cut it)."""

    def __init__(self, d: int, heads: int, head_dim: int, norm: bool, split: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.q = nn.Linear(d, heads * head_dim)
        self.k = nn.Linear(d, heads * head_dim)
        self.v = nn.Linear(d, heads * head_dim)
        self.o = nn.Linear(heads * head_dim, d)
        self.heads, self.head_dim, self.split = heads, head_dim, split

    def _split(self, t: torch.Tensor, b, n) -> torch.Tensor:
        if self.split == "literal":
            h = self.heads
        elif self.split == "-1":
            h = -1
        else:
            h = t.shape[-1] // self.head_dim
        return t.view(b, n, h, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        y = self.norm(x)
        q, k, v = (self._split(f(y), b, n) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, n, -1))


class MLPBlock(nn.Module):
    def __init__(self, d: int, hidden: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class GatedMLP(nn.Module):
    """``x + down(gelu(gate(x)) * up(x))``: an elementwise product of two projections."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.gate(x)) * self.up(x))


class ClassToken(nn.Module):
    """A learned token concatenated in front of the sequence (on the token axis)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)


class PositionEmbedding(nn.Module):
    """A learned (1, tokens, d) table added to the sequence."""

    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class LinearAct(nn.Module):
    def __init__(self, d_in: int, d_out: int, norm: str = "none") -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm = norm1d(norm, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.fc(x)))


class TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


class GlobalPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(x), 1)


class FuzzNet(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ---- building -------------------------------------------------------------------------------


def _conv_block(spec: tuple, c: int) -> tuple[nn.Module, int]:
    kind = spec[0]
    if kind == "conv":
        _, c_out, k, norm = spec
        return ConvBNAct(c, c_out, k, 1, norm), c_out
    if kind == "grouped":
        _, c_out, groups, norm = spec
        return ConvBNAct(c, c_out, 3, groups, norm), c_out
    if kind == "dw":
        _, norm = spec
        return ConvBNAct(c, c, 3, c, norm), c
    if kind == "res":
        _, mid, c_out, norm, project = spec
        return Residual(c, mid, c_out, norm, project), c_out
    if kind == "concat":
        _, a, b, dense = spec
        return Concat(c, a, b, dense), (c if dense else 0) + a + b
    if kind == "se":
        _, hidden = spec
        return SqueezeExcite(c, hidden), c
    if kind == "cnx":
        _, hidden = spec
        return ConvNeXtBlock(c, hidden), c
    if kind == "unet":
        _, mid, norm = spec
        return UNetSkip(c, mid, norm), c + mid
    raise ValueError(spec)


def _token_block(spec: tuple, d: int, tokens: int) -> tuple[nn.Module, int]:
    kind = spec[0]
    if kind == "glu":
        return GatedMLP(d, spec[1]), d
    if kind == "conv1d":
        return TokenConv(d, spec[1]), d
    if kind == "cls":
        return ClassToken(d), d
    if kind == "pos":
        return PositionEmbedding(tokens, d), d
    if kind == "attn":
        _, heads, head_dim, norm, split = spec
        return SelfAttention(d, heads, head_dim, norm, split), d
    if kind == "mlp":
        _, hidden, norm = spec
        return MLPBlock(d, hidden, norm), d
    if kind == "linear":
        _, d_out = spec
        return LinearAct(d, d_out), d_out
    if kind == "ln":
        return nn.LayerNorm(d), d
    raise ValueError(spec)


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random affine parameters for every norm, random running statistics for BatchNorms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    n = m.weight.shape
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.running_mean.shape
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def build(arch: Arch) -> nn.Module:
    """The model ``arch`` describes, in eval mode, with weights from ``arch.seed``."""
    torch.manual_seed(arch.seed)
    layers: list[nn.Module] = []
    c = arch.in_features
    if arch.family == "conv":
        for spec in arch.blocks:
            block, c = _conv_block(spec, c)
            layers.append(block)
        if arch.tokens:
            layers.append(ToTokens())
            tokens = IMAGE * IMAGE
            for spec in arch.tokens:
                block, c = _token_block(spec, c, tokens)
                tokens += spec[0] == "cls"
                layers.append(block)
            layers.append(TokenMean())
        else:
            layers.append(GlobalPool())
    elif arch.family == "tokens":
        tokens = TOKENS
        for spec in arch.tokens:
            block, c = _token_block(spec, c, tokens)
            tokens += spec[0] == "cls"
            layers.append(block)
        layers.append(TokenMean())
    for width, norm in arch.head:
        layers.append(LinearAct(c, width, norm))
        c = width
    layers.append(nn.Linear(c, arch.n_out))
    return randomize_norms(FuzzNet(layers), arch.seed).eval()


# ---- the strategy ---------------------------------------------------------------------------


@st.composite
def conv_blocks(draw, c_in: int, max_blocks: int = 4) -> tuple[tuple, ...]:
    blocks = []
    c = c_in
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(("conv", "grouped", "dw", "res", "concat", "se", "cnx",
                                     "unet")))
        norm = draw(st.sampled_from(NORMS_2D))
        if kind == "grouped":
            out = draw(st.sampled_from(WIDTHS))
            common = [g for g in (2, 3, 4, 6) if c % g == 0 and out % g == 0]
            if not common:
                kind = "conv"
            else:
                spec = ("grouped", out, draw(st.sampled_from(common)), norm)
        if kind == "conv":
            spec = ("conv", draw(st.sampled_from(WIDTHS)), draw(st.sampled_from((1, 3))), norm)
        elif kind == "dw":
            spec = ("dw", norm)
        elif kind == "res":
            spec = ("res", draw(st.sampled_from(WIDTHS)),
                    draw(st.sampled_from((c,) + WIDTHS)), norm, draw(st.booleans()))
        elif kind == "concat":
            spec = ("concat", draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS)),
                    draw(st.booleans()))
        elif kind == "se":
            spec = ("se", draw(st.sampled_from((2, 3, 4))))
        elif kind == "cnx":
            spec = ("cnx", draw(st.sampled_from(WIDTHS)))
        elif kind == "unet":
            spec = ("unet", draw(st.sampled_from(WIDTHS)), norm)
        c = _width_after(spec, c)
        blocks.append(spec)
    return tuple(blocks)


def _width_after(spec: tuple, c: int) -> int:
    kind = spec[0]
    if kind in ("conv", "grouped"):
        return spec[1]
    if kind == "res":
        return spec[2]
    if kind == "concat":
        return (c if spec[3] else 0) + spec[1] + spec[2]
    if kind == "unet":
        return c + spec[1]
    return c


@st.composite
def token_blocks(draw, min_blocks: int = 0, max_blocks: int = 3) -> tuple[tuple, ...]:
    blocks = []
    for _ in range(draw(st.integers(min_blocks, max_blocks))):
        kind = draw(st.sampled_from(("attn", "attn", "mlp", "glu", "linear", "ln", "cls", "pos",
                                     "conv1d")))
        if kind == "attn":
            spec = ("attn", draw(st.integers(1, 4)), draw(st.sampled_from((2, 3, 4))),
                    draw(st.booleans()), draw(st.sampled_from(("shape", "-1", "literal"))))
        elif kind == "mlp":
            spec = ("mlp", draw(st.sampled_from(WIDTHS)), draw(st.booleans()))
        elif kind in ("linear", "glu"):
            spec = (kind, draw(st.sampled_from(WIDTHS)))
        elif kind == "conv1d":
            spec = ("conv1d", draw(st.booleans()))
        else:
            spec = (kind,)
        blocks.append(spec)
    return tuple(blocks)


@st.composite
def architectures(draw) -> Arch:
    """A random :class:`Arch`: half conv, a quarter tokens, a quarter flat MLPs."""
    family = draw(st.sampled_from(("conv", "conv", "tokens", "mlp")))
    head = tuple(
        (draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(NORMS_1D)))
        for _ in range(draw(st.integers(0 if family == "conv" else 1, 2)))
    )
    seed = draw(st.integers(0, 2**16))
    n_out = draw(st.integers(2, 5))
    if family == "mlp":
        return Arch("mlp", draw(st.integers(3, 10)), (), (), head, n_out, seed)
    if family == "tokens":
        return Arch("tokens", draw(st.sampled_from(WIDTHS)), (), draw(token_blocks(1)), head,
                    n_out, seed)
    c_in = draw(st.sampled_from((1, 3)))
    return Arch("conv", c_in, draw(conv_blocks(c_in)), draw(token_blocks()), head, n_out, seed)


def describe(arch: Arch) -> str:
    """One line per block, for failure messages."""
    lines = [f"{arch.family} in={arch.in_features} seed={arch.seed} out={arch.n_out}"]
    lines += [f"  {b}" for b in arch.blocks] + [f"  tokens {b}" for b in arch.tokens]
    lines += [f"  head {h}" for h in arch.head]
    return "\n".join(lines)


__all__ = ["Arch", "architectures", "build", "describe", "randomize_norms"]
