"""Projection and prediction heads built from a list of blocks (the idea of lightly's ``ProjectionHead``).

A :class:`Block` is one linear map with what follows it: ``(in_dim, out_dim, norm, act, bias)``. A head is the
blocks in order, either on vectors (``nn.Linear`` + ``BatchNorm1d``) or, with ``dense=True``, at every location
of a map (1x1 ``nn.Conv2d`` + ``BatchNorm2d``, statistics over batch and positions). Layers are created in block
order (linear, norm, activation), so a head built here draws the same initial weights from torch's RNG as the
same layers written out by hand.

DINO-family parts (Caron et al., ICCV 2021; used by CrIBo and SelfPatch): :class:`DINOHead` (GELU MLP, L2-normalised
bottleneck, weight-normalised ``last_layer``), :func:`weight_normed_linear` and :func:`cancel_last_layer_grads`
(DINO's ``freeze_last_layer``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn


class Block(NamedTuple):
    """One layer of a head: a linear map ``in_dim -> out_dim`` (bias unless ``bias=False``), then BatchNorm when
    ``norm``, then the activation ``activation`` (``"relu"`` or ``"gelu"``) when ``act``."""

    in_dim: int
    out_dim: int
    norm: bool = False
    act: bool = False
    bias: bool = True
    activation: str = "relu"


_ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


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
                if b.activation not in _ACTIVATIONS:
                    raise ValueError(f"unknown activation {b.activation!r}; choose one of {sorted(_ACTIVATIONS)}")
                layers.append(_ACTIVATIONS[b.activation]())
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


# ----------------------------------------------------------------------------------------------------
# DINO-family head (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)
# ----------------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2 normalisation, a weight-normalised bias-free last layer.

    ``mlp``: ``in_dim -> hidden_dim`` (GELU) ``-> ... -> bottleneck_dim`` with ``nlayers`` linear maps (BatchNorm
    after the hidden ones when ``use_bn``); linear weights truncated-normal (std 0.02), biases 0, as DINO, CrIBo and
    SelfPatch initialise theirs. ``last_layer``: ``bottleneck_dim -> out_dim`` without bias, weight-normalised
    (``torch.nn.utils.parametrizations.weight_norm``: ``W = g * v / ||v||`` per output unit, g initialised to 1);
    with ``norm_last_layer`` g is frozen at 1, so every prototype has unit norm. Freezing for the first steps
    (DINO's ``freeze_last_layer``) goes by the name: :func:`cancel_last_layer_grads` drops the gradients of every
    parameter whose name contains ``last_layer``, so a subclass adding ``last_layer_c`` (CrIBo) is covered.

    ``embed(x)``: (..., in_dim) -> (..., bottleneck_dim) L2-normalised; ``forward(x)``: (..., in_dim) ->
    (..., out_dim) logits (``last_layer(embed(x))``). With ``use_bn`` the input must be (N, in_dim).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        dims = [int(in_dim), *([int(hidden_dim)] * (nlayers - 1)), int(bottleneck_dim)]
        blocks = [Block(a, b, norm=use_bn, act=True, activation="gelu") for a, b in zip(dims[:-2], dims[1:-1])]
        blocks.append(Block(dims[-2], dims[-1]))
        self.mlp = ProjectionHead(blocks)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, norm=norm_last_layer)
        self.out_dim = int(out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(x), dim=-1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(x))


def weight_normed_linear(in_dim: int, out_dim: int, norm: bool = True) -> nn.Linear:
    """A bias-free ``nn.Linear`` with weight normalisation (g = 1; frozen when ``norm``), DINO's last layer.

    State-dict keys: ``parametrizations.weight.original0`` (g, (out_dim, 1)) and ``...original1`` (v).
    """
    from torch.nn.utils.parametrizations import weight_norm

    layer = weight_norm(nn.Linear(int(in_dim), int(out_dim), bias=False))
    g = layer.parametrizations.weight.original0
    with torch.no_grad():
        g.fill_(1.0)
    if norm:
        g.requires_grad_(False)
    return layer


def cancel_last_layer_grads(module: nn.Module, step: int, freeze_steps: int, key: str = "last_layer") -> bool:
    """DINO's ``freeze_last_layer``: while ``step < freeze_steps`` set the gradient of every parameter of
    ``module`` whose name contains ``key`` to None, so the optimiser skips it (no update, and AdamW's moments
    stay untouched). Call it from :meth:`~densekit.train.objective.Objective.before_optimizer_step`. Returns
    whether gradients were cancelled."""
    if step >= freeze_steps:
        return False
    for name, p in module.named_parameters():
        if key in name:
            p.grad = None
    return True

