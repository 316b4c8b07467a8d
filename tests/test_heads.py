"""The head builder (densekit.train.heads): layer layout, dense = per-location, initial weights by seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densekit.train.heads import Block, ProjectionHead, mlp_head


def test_mlp_head_layout() -> None:
    head = mlp_head(8, [16, 16, 4], last_bias=False)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head.layers[0].bias is not None and head.layers[-1].bias is None
    assert (head.in_dim, head.out_dim) == (8, 4)
    plain = mlp_head(8, [16, 4], norm=False, dense=True)
    assert [type(m).__name__ for m in plain.layers] == ["Conv2d", "ReLU", "Conv2d"]
    assert mlp_head(8, [3]).blocks == (Block(8, 3),)


def test_same_seed_same_weights_as_the_layers_written_out() -> None:
    torch.manual_seed(3)
    built = mlp_head(10, [12, 6])
    torch.manual_seed(3)
    by_hand = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12), nn.ReLU(inplace=True), nn.Linear(12, 6))
    for a, b in zip(built.state_dict().values(), by_hand.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dense_head_is_the_vector_head_at_every_location() -> None:
    torch.manual_seed(0)
    vec = mlp_head(5, [7, 3]).eval()  # eval: BatchNorm uses its (equal) running statistics in both
    dense = mlp_head(5, [7, 3], dense=True).eval()
    with torch.no_grad():
        for v, d in zip(vec.parameters(), dense.parameters(), strict=True):
            d.copy_(v.view_as(d))
    x = torch.randn(2, 5, 4, 6)
    per_location = vec(x.permute(0, 2, 3, 1).reshape(-1, 5)).reshape(2, 4, 6, 3).permute(0, 3, 1, 2)
    assert torch.allclose(dense(x), per_location, atol=1e-6)
    assert dense(x).shape == (2, 3, 4, 6)


def test_trains_and_refuses_bad_widths() -> None:
    head = ProjectionHead([Block(4, 8, norm=True, act=True), Block(8, 2, bias=False)])
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    first = None
    for _ in range(30):
        loss = (head(x) - y).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    with pytest.raises(ValueError):
        mlp_head(4, [])
    with pytest.raises(ValueError):
        mlp_head(4, [0, 2])
    with pytest.raises(ValueError):
        ProjectionHead([])
