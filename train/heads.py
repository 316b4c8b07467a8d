"""Projection and prediction heads built from a list of blocks (the idea of lightly's ``ProjectionHead``).

A :class:`Block` is one linear map with what follows it: ``(in_dim, out_dim, norm, act, bias)``. A head is the
blocks in order, either on vectors (``nn.Linear`` + ``BatchNorm1d``) or, with ``dense=True``, at every location
of a map (1x1 ``nn.Conv2d`` + ``BatchNorm2d``, statistics over batch and positions). Layers are created in block
order (linear, norm, activation), so a head built here draws the same initial weights from torch's RNG as the
same layers written out by hand.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn


class Block(NamedTuple):
    """One layer of a head: a linear map ``in_dim -> out_dim`` (bias unless ``bias=False``), then BatchNorm when
    ``norm``, then ReLU when ``act``."""

    in_dim: int
    out_dim: int
    norm: bool = False
    act: bool = False
    bias: bool = True


class ProjectionHead(nn.Module):
    """An MLP head from :class:`Block` s.

    ``forward``: (N, in_dim) -> (N, out_dim); with ``dense=True`` (B, in_dim, h, w) -> (B, out_dim, h, w).
    """

    def __init__(self, blocks: Sequence[Block], dense: bool = False) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a head needs at least one block")
        linear, norm = (_conv1x1, nn.BatchNorm2d) if dense else (nn.Linear, nn.BatchNorm1d)
        layers: list[nn.Module] = []
        for b in blocks:
            layers.append(linear(b.in_dim, b.out_dim, bias=b.bias))
            if b.norm:
                layers.append(norm(b.out_dim))
            if b.act:
                layers.append(nn.ReLU(inplace=True))
        self.blocks = tuple(Block(*b) for b in blocks)
        self.dense = bool(dense)
        self.layers = nn.Sequential(*layers)

    @property
    def in_dim(self) -> int:
        return self.blocks[0].in_dim

    @property
    def out_dim(self) -> int:
        return self.blocks[-1].out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv1x1(in_dim: int, out_dim: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, 1, bias=bias)


def mlp_head(in_dim: int, widths: Sequence[int], *, norm: bool = True, last_bias: bool = True,
             dense: bool = False) -> ProjectionHead:
    """``in_dim -> widths[0] -> ... -> widths[-1]``: every layer but the last followed by (BatchNorm when ``norm``
    and) ReLU; the last is a plain linear map (bias unless ``last_bias=False``).

    E.g. BYOL's projector ``mlp_head(d, [4096, 256])``, SimCLR/MoCo v2's ``mlp_head(d, [2048, 128], norm=False)``,
    VICReg's expander ``mlp_head(d, [8192] * 3, last_bias=False)``.
    """
    dims = [int(in_dim), *(int(w) for w in widths)]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"a head needs positive widths, got {in_dim} -> {list(widths)}")
    blocks = [Block(a, b, norm=norm, act=True) for a, b in zip(dims[:-2], dims[1:-1])]
    blocks.append(Block(dims[-2], dims[-1], bias=last_bias))
    return ProjectionHead(blocks, dense=dense)
