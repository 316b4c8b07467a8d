"""SelfPatch: neighbouring patches as positives (Yun, Lee, Kim, Shin, "Patch-level Representation Learning for
Self-supervised Vision Transformers", CVPR 2022; official code github.com/alinlab/SelfPatch, DINO + SelfPatch).

DINO's multi-crop self-distillation, plus a patch-level term. Per view, the teacher's last-block patch tokens pick,
for every patch i, the ``k`` (4) most cosine-similar patches among its 8 neighbours (a 3x3 window without i); an
aggregation module (2 CaiT-style class-attention blocks with a learnable query) summarises those k tokens into
i's target. The student's patch i is its own raw token. Both go through a patch DINO head and are matched by
DINO's cross-entropy in the same view, patch by patch. The image-level token is the same aggregation module's
query attending to all patch tokens (the ViT has no CLS token), scored with DINO's image loss.
``loss = L_image + 0.1 * L_patch``.

Asymmetry kept from the official code (``main_selfpatch.py``): the student aggregates nothing at patch level (raw
tokens), the teacher aggregates neighbours only (patch i itself is never in its target); the teacher is an EMA
copy without stochastic depth (student drop path 0.1); local crops go through the teacher too (their patch
loss); SelfPatch evaluates the teacher, so the teacher's backbone is exported.

Official details kept: the neighbourhood wraps around the grid borders (``get_local_index``: patch 0 of a
6x6 grid has neighbours {1, 5, 6, 7, 11, 30, 31, 35}); class attention's keys include its own query token;
patch centre over all patches of all views; constant teacher temperature 0.04; lambda 0.1.

Differences from the official code, on purpose:

* Any h x w grid: the official head hard-codes 196 and 36 tokens (``assert(False)`` otherwise) and square grids;
  :func:`neighbour_index` builds the table for any grid of at least ``window`` x ``window``.
  ``border="clamp"`` (not in the official code) keeps the window inside the grid instead of wrapping.
* The neighbour similarities come from one (B, N, N) cosine matrix gathered at the table, not from gathering
  (B, N, 8, D) token copies: the same numbers, less memory for N < 8 D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.cait import ClassAttn
from torch import nn

from densekit.serve.errors import DensekitError

BORDERS = ("wrap", "clamp")


# ----------------------------------------------------------------------------------------------------------------
# neighbours


def neighbour_index(h: int, w: int, window: int = 3, border: str = "wrap") -> torch.Tensor:
    """The candidate positives of every patch of an h x w grid (raster order): (h * w, window^2 - 1) long.

    Row i lists, in raster order, the patches of the ``window`` x ``window`` square around patch i except i.
    ``border="wrap"`` (official): the square wraps around the grid edges (a torus). ``"clamp"``: the square is
    shifted to lie inside the grid, so border patches also get window^2 - 1 distinct neighbours.
    """
    if window < 3 or window % 2 == 0:
        raise DensekitError(f"selfpatch window must be odd and >= 3, got {window}")
    if border not in BORDERS:
        raise DensekitError(f"selfpatch border must be one of {', '.join(BORDERS)}, got {border!r}")
    if h < window or w < window:
        raise DensekitError(f"selfpatch needs a patch grid of at least {window}x{window}, got {h}x{w}: "
                            "use larger crops or a smaller patch size")
    r = window // 2
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1, 1), xs.reshape(-1, 1)
    if border == "clamp":
        ys, xs = ys.clamp(r, h - 1 - r), xs.clamp(r, w - 1 - r)
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    rows = ((ys + dy.reshape(1, -1)) % h) * w + (xs + dx.reshape(1, -1)) % w  # (N, window^2) square members
    rows = rows.sort(dim=1).values
    keep = rows != torch.arange(h * w).unsqueeze(1)
    return rows[keep].reshape(h * w, window * window - 1)


def select_neighbours(tokens: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """For every patch, its ``k`` most cosine-similar candidates: tokens (B, N, D), index (N, M) -> (B, N, k) long
    patch ids (into N), most similar first."""
    if not 1 <= k <= index.shape[1]:
        raise DensekitError(f"selfpatch k must be in [1, {index.shape[1]}] for this window, got {k}")
    x = F.normalize(tokens.float(), dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    cand = index.to(tokens.device).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    top = sim.gather(2, cand).topk(k, dim=-1).indices  # (B, N, k) positions in the candidate list
    return cand.gather(2, top)


# ----------------------------------------------------------------------------------------------------------------
# the aggregation module


class ClassAttentionBlock(nn.Module):
    """One pre-norm class-attention block (CaiT's, without LayerScale, as SelfPatch's ``LayerScale_Block_CA``).

    ``forward(x, query)``: x (B, N, D) keys/values, query (B, 1, D) -> (B, 1, D). The query attends to
    ``[query, x]``; then an MLP (ratio 4, GELU) on the query, both residual.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        query = query + self.attn(self.norm1(torch.cat([query, x], dim=1)))
        return query + self.mlp(self.norm2(query))


class SelfPatchHead(nn.Module):
    """SelfPatch's aggregation module (``SelfPatchHead``): a learnable query, ``depth`` class-attention blocks, a
    final LayerNorm.

    ``forward(tokens, grid_hw, aggregate)``: tokens (B, N, D) last-block patch tokens of an h x w grid (N = h w) ->
    (image (B, D), patches (B, N, D)). ``image``: the query after attending to all N tokens. ``patches``: with
    ``aggregate=False`` (student) the tokens themselves; with ``aggregate=True`` (teacher) patch i is a fresh
    query attending to its ``k`` chosen neighbours only (:func:`select_neighbours`). All outputs LayerNorm'd.
    """

    def __init__(self, dim: int, num_heads: int, k: int = 4, depth: int = 2, window: int = 3,
                 border: str = "wrap") -> None:
        super().__init__()
        if border not in BORDERS:
            raise DensekitError(f"selfpatch border must be one of {', '.join(BORDERS)}, got {border!r}")
        if not 1 <= k <= window * window - 1:
            raise DensekitError(f"selfpatch k must be in [1, {window * window - 1}] for window {window}, got {k}")
        if dim % num_heads:
            raise DensekitError(f"selfpatch head: width {dim} is not divisible by {num_heads} heads")
        self.k, self.window, self.border = int(k), int(window), border
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.query, std=0.02)
        self.apply(_init_linear)
        self._index: dict[tuple[int, int], torch.Tensor] = {}

    def index(self, h: int, w: int) -> torch.Tensor:
        """:func:`neighbour_index` for this head's window and border, cached per grid."""
        if (h, w) not in self._index:
            self._index[(h, w)] = neighbour_index(h, w, self.window, self.border)
        return self._index[(h, w)]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The query after the blocks over x (B, N, D) -> (B, D), not normalised."""
        q = self.query.expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(x, q)
        return q[:, 0]

    def aggregate(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Every patch's target from its chosen neighbours: tokens (B, N, D) -> (B, N, D), not normalised."""
        b, n, d = tokens.shape
        ids = select_neighbours(tokens, self.index(*grid_hw), self.k)  # (B, N, k)
        nb = tokens.gather(1, ids.reshape(b, n * self.k, 1).expand(-1, -1, d))
        return self.pool(nb.reshape(b * n, self.k, d)).reshape(b, n, d)

    def forward(self, tokens: torch.Tensor, grid_hw: tuple[int, int],
                aggregate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = grid_hw
        if tokens.shape[1] != h * w:
            raise DensekitError(f"selfpatch head: {tokens.shape[1]} tokens do not make a {h}x{w} grid")
        image = self.pool(tokens)
        patches = self.aggregate(tokens, grid_hw) if aggregate else tokens
        return self.norm(image), self.norm(patches)


def _init_linear(m: nn.Module) -> None:
    # the official head's init (DINO's): truncated normal 0.02 for every linear map, zero bias
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
