"""SelfPatch: neighbours are the top-k of the window (brute force, any grid), the teacher's patch target depends on
the chosen neighbours only, the objective trains, resumes bit-identically and refuses a CNN in one line."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError
from densekit.train.objectives.selfpatch import SelfPatchHead, neighbour_index, select_neighbours


def _window_members(i: int, h: int, w: int, border: str) -> set[int]:
    """Brute force: the patches j != i within Chebyshev distance 1 of i (torus distance for wrap; for clamp,
    distance to i's centre moved one cell inside the grid)."""
    y, x = divmod(i, w)
    if border == "clamp":
        y, x = min(max(y, 1), h - 2), min(max(x, 1), w - 2)
    out = set()
    for j in range(h * w):
        jy, jx = divmod(j, w)
        dy, dx = abs(jy - y), abs(jx - x)
        if border == "wrap":
            dy, dx = min(dy, h - dy), min(dx, w - dx)
        if j != i and max(dy, dx) <= 1:
            out.add(j)
    return out


@pytest.mark.parametrize("h,w,border", [(6, 6, "wrap"), (4, 7, "wrap"), (3, 5, "wrap"), (5, 4, "clamp")])
def test_neighbours_are_the_top_k_of_the_window(h: int, w: int, border: str) -> None:
    idx = neighbour_index(h, w, border=border)
    assert [set(r) for r in idx.tolist()] == [_window_members(i, h, w, border) for i in range(h * w)]
    tokens = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * 10 + w))
    chosen = select_neighbours(tokens, idx, 4)
    cos = F.cosine_similarity(tokens.unsqueeze(2), tokens.unsqueeze(1), dim=-1)  # (B, N, N)
    for b, i in itertools.product(range(2), range(h * w)):
        ranked = sorted(_window_members(i, h, w, border), key=lambda j: -float(cos[b, i, j]))
        assert set(chosen[b, i].tolist()) == set(ranked[:4]), (b, i)
    # the official table for the corner of a 6x6 grid (wrap-around): explicit, not derived
    assert set(neighbour_index(6, 6)[0].tolist()) == {1, 5, 6, 7, 11, 30, 31, 35}


def test_teacher_target_uses_only_the_chosen_neighbours() -> None:
    torch.manual_seed(0)
    h, w, d = 4, 6, 32
    head = SelfPatchHead(d, num_heads=4).eval()
    tokens = torch.randn(2, h * w, d)
    i = 7
    with torch.no_grad():
        _, target = head(tokens, (h, w), aggregate=True)
        chosen = set(select_neighbours(tokens, head.index(h, w), 4)[0, i].tolist())

        def target_after(j: int, new: torch.Tensor) -> torch.Tensor:
            t = tokens.clone()
            t[0, j] = new
            return head(t, (h, w), aggregate=True)[1][0, i]

        window = set(head.index(h, w)[i].tolist())
        for j in range(h * w):
            if j != i and j not in window:  # outside i's window: anything goes
                assert torch.equal(target_after(j, 5 * torch.randn(d)), target[0, i]), j
            elif j in window and j not in chosen:  # in the window, made the least similar: still not chosen
                assert torch.equal(target_after(j, -3 * tokens[0, i]), target[0, i]), j
        # i itself is not in its own target (scaling keeps every cosine ranking, so the same neighbours are chosen)
        assert torch.equal(target_after(i, 2 * tokens[0, i]), target[0, i])
        for j in chosen:
            assert not torch.allclose(target_after(j, 5 * torch.randn(d)), target[0, i]), j
        # the student's patch i is its own token, nothing else: the opposite dependence
        def student_after(j: int) -> torch.Tensor:
            t = tokens.clone()
            t[0, j] = 5 * torch.randn(d)
            return head(t, (h, w), aggregate=False)[1][0, i]

        student = head(tokens, (h, w), aggregate=False)[1][0, i]
        assert not torch.allclose(student_after(i), student)
        assert all(torch.equal(student_after(j), student) for j in chosen)
        # on the torus (wrap) the targets are translation-equivariant, on a non-square grid too
        grid = tokens.reshape(2, h, w, d)
        rolled = grid.roll(shifts=(1, 2), dims=(1, 2)).reshape(2, h * w, d)
        expect = target.reshape(2, h, w, d).roll(shifts=(1, 2), dims=(1, 2)).reshape(2, h * w, d)
        assert torch.allclose(head(rolled, (h, w), aggregate=True)[1], expect, atol=1e-5)


def test_bad_grid_and_k_are_one_line() -> None:
    for call, match in [(lambda: neighbour_index(2, 5), "at least 3x3"),
                        (lambda: neighbour_index(4, 4, border="reflect"), "border"),
                        (lambda: SelfPatchHead(32, 4, k=9), "k must be")]:
        with pytest.raises(DensekitError, match=match) as exc:
            call()
        assert "\n" not in str(exc.value)
