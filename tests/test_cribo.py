"""CrIBo (train/objectives/cribo.py): the properties its parts claim, on plain tensors, then through the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densekit.train.objectives.cribo import (
    balanced_sinkhorn,
    cycle_consistent_nn,
    joint_clustering,
    object_representations,
)


def _grid(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (h*w, 2)


def test_sinkhorn_balances_where_argmin_would_not() -> None:
    """Every token prefers cluster 0: the arg-min of the cost puts all 64 there, the transport plan spreads them."""
    gen = torch.Generator().manual_seed(0)
    n, k = 64, 8
    cost = 0.5 + 0.1 * torch.rand(1, n, k, generator=gen)
    cost[..., 0] = 0.1 * torch.rand(1, n, generator=gen)  # column 0 is the cheapest for every token
    assert torch.bincount(cost[0].argmin(dim=1), minlength=k).tolist() == [n] + [0] * (k - 1)
    plan = balanced_sinkhorn(cost, torch.full((1, 1, k), 1.0 / k))
    assert torch.allclose(plan.sum(dim=1), torch.full((1, k), 1.0 / k), atol=1e-6)
    sizes = torch.bincount(plan[0].argmax(dim=1), minlength=k)
    assert sizes.min() >= n // (2 * k), sizes.tolist()


def test_spatial_term_makes_clusters_spatially_coherent() -> None:
    """Tokens without semantic structure: the spatial term doubles how often 4-neighbours share a cluster."""
    gen = torch.Generator().manual_seed(1)
    b, h, w, k = 2, 8, 8, 8
    pos = _grid(h, w)[None].repeat(b, 2, 1)  # two views of the same place: (B, 2N, 2)
    tokens = torch.randn(b, 2 * h * w, 16, generator=gen)
    init = torch.stack([torch.randperm(2 * h * w, generator=gen)[:k] for _ in range(b)])

    def agreement(alpha: float) -> float:
        assign = joint_clustering(tokens, pos, init, pos_alpha=alpha, n_iter=3)
        assert torch.equal(assign.sum(dim=2), torch.ones(b, 2 * h * w))  # one cluster per token
        lab = assign.argmax(dim=2).reshape(b, 2, h, w)
        return float(((lab[..., 1:, :] == lab[..., :-1, :]).float().mean()
                      + (lab[..., :, 1:] == lab[..., :, :-1]).float().mean()) / 2)

    assert agreement(1.0) > 1.5 * agreement(0.0)


def test_joint_clustering_gives_the_view_correspondence_and_drops_absent_objects() -> None:
    gen = torch.Generator().manual_seed(2)
    h = w = 6
    k = 6
    proto = F.normalize(torch.randn(k, 32, generator=gen), dim=1)
    labels = (torch.arange(h * w) // 6)  # six horizontal stripes, one prototype each
    view = proto[labels] + 0.05 * torch.randn(h * w, 32, generator=gen)
    pos = _grid(h, w)
    init = torch.tensor([[0, 6, 12, 18, 24, 30]])
    # identical views: identical halves, every object present in both, c1 == c2
    assign = joint_clustering(torch.cat([view, view])[None], torch.cat([pos, pos])[None], init)
    a1, a2 = assign[:, : h * w], assign[:, h * w :]
    assert torch.equal(a1, a2)
    o1, p1 = object_representations(view[None], a1)
    o2, p2 = object_representations(view[None], a2)
    assert torch.equal(p1 & p2, p1) and int(p1.sum()) >= 2 and torch.allclose(o1, o2)
    # view 2 shows only the bottom half of the image: the top stripes' objects are absent from it
    top, bottom = labels < 3, labels >= 3
    v2, q2 = view[bottom], pos[bottom]
    assign = joint_clustering(torch.cat([view, v2])[None], torch.cat([pos, q2])[None], init)
    a1, a2 = assign[:, : h * w], assign[:, h * w :]
    _, p1 = object_representations(view[None], a1)
    _, p2 = object_representations(v2[None], a2)
    valid = p1 & p2
    top_clusters = set(a1[0, top].argmax(dim=1).tolist())
    assert top_clusters and not any(bool(valid[0, c]) for c in top_clusters - set(a2[0].argmax(dim=1).tolist()))
    assert bool((p1 & ~p2).any())  # some object of view 1 is absent from view 2 and is dropped


def test_cycle_keeps_only_mutual_neighbours() -> None:
    gen = torch.Generator().manual_seed(3)
    m, d = 6, 32
    c1, c2 = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)
    noise = lambda x: x + 0.05 * torch.randn(x.shape, generator=gen)  # noqa: E731
    distract = torch.randn(10, d, generator=gen)
    bank1 = torch.cat([noise(c1), distract])
    bank2 = torch.cat([noise(c2), torch.randn(10, d, generator=gen)])
    valid = torch.ones(m + 10, dtype=torch.bool)
    own = torch.arange(m)
    nn, keep = cycle_consistent_nn(c1, bank1, bank2, valid, c2, torch.ones(m, dtype=torch.bool), own)
    assert nn.tolist() == list(range(m)) and keep.all()
    # break the view link of two bank entries (their view-2 halves swapped): exactly those two fail
    bank2[[0, 1]] = bank2[[1, 0]]
    _, keep = cycle_consistent_nn(c1, bank1, bank2, valid, c2, torch.ones(m, dtype=torch.bool), own)
    assert keep.tolist() == [False, False, True, True, True, True]
    # invalid bank entries are never retrieved; an empty bank keeps nothing
    valid[:m] = False
    nn, keep = cycle_consistent_nn(c1, bank1, bank2, valid, c2, torch.ones(m, dtype=torch.bool), own)
    assert bool((nn >= m).all())
    _, keep = cycle_consistent_nn(c1, bank1, bank2, torch.zeros_like(valid), c2, torch.ones(m, dtype=torch.bool), own)
    assert not keep.any()
