"""CrIBo: cross-image object-level bootstrapping (Lebailly, Stegmüller, Bozorgtabar, Thiran, Tuytelaars,
"CrIBo: Self-Supervised Learning via Cross-Image Object-Level Bootstrapping", ICLR 2024; official code
github.com/tileb1/CrIBo, ``main_cribo.py``; reimplemented here, nothing copied).

Two global views of one image go through a student ViT and its EMA teacher. Per step:

1. **Joint-space clustering** on the teacher: the L2-normalised patch tokens of both views, (B, 2N, D), are
   clustered into K groups per image by Sinkhorn-Knopp on the cost ``-cos(token, centroid) + pos_alpha * spatial``
   (spatial: the pixel distance, in the original image, from a token to the nearest other member of the cluster;
   :func:`spatial_cost`), ``n_iter`` outer rounds with hard assignments and, with ``update_c``, the column
   marginal set to the current cluster sizes (so only the first round is uniformly balanced).
2. **Object representations**: a cluster's mean last-layer token in each view (:func:`object_representations`);
   a cluster absent from either view is dropped (no loss, no gradient, not queued). The student's objects reuse
   the teacher's assignments on the student's tokens.
3. **Cross-view object loss** L_cv^o: DINO cross-entropy between teacher object k of view i and student object k
   of view j != i, through the object head (its own last layer and centre).
4. **Cross-image object loss** L_ci^o: each teacher object of view 1 retrieves its nearest neighbour in memory
   bank 1 (past teacher objects, pre-head, cosine); the neighbour's view-2 partner in bank 2 must retrieve, among
   all objects of view 2 in the (global) batch, the query's own view-2 object (cycle consistency,
   :func:`cycle_consistent_nn`). Kept pairs bootstrap: teacher head on the neighbour vs the student's object of
   the other view; and the mirror (view 2 -> bank 2 -> bank 1 -> view 1).
5. **Global loss** L_cv^g: DINO on the CLS tokens across views. ``loss = L_cv^g + L_cv^o + L_ci^o``.

Differences from the official code, on purpose (each keeps 1 process == N processes and exact resume):

* The cost matrix is min-max normalised **per image** (official: over the whole local batch tensor, which makes
  the clustering depend on the other images on the same GPU).
* The K initial centroid indices are drawn in the transform from the sample's generator (official: torch
  ``multinomial`` in the forward pass).
* A token's hard assignment is its single arg-max cluster (official: every cluster equal to the row maximum, so
  exact ties give a token to several clusters).
* Memory banks are fixed-shape (Q images x K slots x D) with a validity mask, start empty (official: uniform
  random entries that count as valid) and are a ring buffer (official: newest first; the same set of entries).
  The cross-image loss starts at ``nn_start`` (a fraction of the run, official: epoch 1) and once the banks are
  full. The backward search of the cycle runs over the objects of the global batch (official: the local batch).
* Loss means over a variable number of objects use global counts (all-reduced), so DDP gives the gradients of
  one process; the cross-image terms keep the official normalisation: both are divided by the number of kept
  view-1 queries, summed and halved (the paper divides the mirror term by its own count). L_cv^o keeps the
  official extra /2 (the project page's formula has none).
* Schedules are functions of the step (official: of the epoch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError


# ----------------------------------------------------------------------------------------------------------------
# Joint-space clustering


def spatial_cost(positions: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """CrIBo's spatial term: for token t and cluster k, the distance from t to the nearest member m != t of k.

    Args:
        positions: (B, T, 2) token positions (pixels of the original image).
        assign: (B, T, K) hard assignments (0/1).
    Returns:
        (B, T, K) in [0, 1]: divided by the image's maximum; a (token, cluster) pair without such a member (empty
        cluster, or the token alone at its position) gets the image's mean cost, as the official code does.
    """
    dist = torch.cdist(positions.float(), positions.float())  # (B, T, T)
    # Zero distances are the token itself (or a token at the same place): they do not count as "near".
    member = (assign[:, None, :, :] > 0) & (dist[..., None] > 0)  # (B, T, T, K)
    near = torch.where(member, dist[..., None], torch.full_like(dist[..., None], float("inf"))).amin(dim=2)
    has = torch.isfinite(near)
    near = torch.where(has, near, torch.zeros_like(near))
    mean = near.mean(dim=(1, 2), keepdim=True)
    near = torch.where(has, near, mean.expand_as(near))
    return near / near.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def balanced_sinkhorn(cost: torch.Tensor, col: torch.Tensor, lam: float = 20.0, iters: int = 5) -> torch.Tensor:
    """Sinkhorn-Knopp transport plan with uniform rows and column marginal ``col`` (CrIBo's ``sinkhorn``), fp32.

    Args:
        cost: (B, T, K) cost in [0, 1].
        col: (B, 1, K) column marginal (sums to 1).
    Returns:
        (B, T, K) plan: rows ~ 1/T, columns exactly ``col`` (the last scaling is the columns').
    """
    with torch.autocast(device_type=cost.device.type, enabled=False):
        p = torch.exp(-lam * cost.float())
        p = p / p.sum(dim=(1, 2), keepdim=True)
        row = 1.0 / cost.shape[1]
        for _ in range(iters):
            p = p * (row / p.sum(dim=2, keepdim=True))
            p = p * (col.float() / p.sum(dim=1, keepdim=True))
        return torch.nan_to_num(p, nan=1e-8)


@torch.no_grad()
def joint_clustering(tokens: torch.Tensor, positions: torch.Tensor, init_idx: torch.Tensor, *,
                     pos_alpha: float = 1.0, lam: float = 20.0, sinkhorn_iters: int = 5, n_iter: int = 5,
                     update_c: bool = True) -> torch.Tensor:
    """Cluster the tokens of both views of each image jointly (CrIBo's ``compute_assignments``).

    Args:
        tokens: (B, T, D) tokens of both views (T = 2N; normalised here).
        positions: (B, T, 2) their positions in the original image.
        init_idx: (B, K) int64, distinct token indices of the initial centroids (drawn in the transform).
    Returns:
        (B, T, K) float hard assignments (one 1 per token).
    """
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        z = F.normalize(tokens.float(), dim=-1)
        b, t, _ = z.shape
        k = init_idx.shape[1]
        assign = F.one_hot(init_idx, t).transpose(1, 2).float()  # (B, T, K): the seeds are the only members
        centroids = z.gather(1, init_idx[..., None].expand(-1, -1, z.shape[2]))  # (B, K, D)
        col = torch.full((b, 1, k), 1.0 / k, device=z.device)
        for _ in range(n_iter):
            cost = -torch.einsum("btd,bkd->btk", z, centroids) + pos_alpha * spatial_cost(positions, assign)
            lo = cost.amin(dim=(1, 2), keepdim=True)
            hi = cost.amax(dim=(1, 2), keepdim=True)
            cost = (cost - lo) / (hi - lo).clamp_min(1e-12)  # per image: see the module docstring
            plan = balanced_sinkhorn(cost, col, lam, sinkhorn_iters)
            assign = F.one_hot(plan.argmax(dim=2), k).float()
            if update_c:
                col = assign.sum(dim=1, keepdim=True) + 1e-2
                col = col / col.sum(dim=2, keepdim=True)
            centroids = F.normalize(torch.einsum("btd,btk->bkd", z, assign), dim=-1)
        return assign


def object_representations(tokens: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token of each cluster in one view.

    Args:
        tokens: (B, N, D) one view's last-layer tokens.
        assign: (B, N, K) that view's hard assignments.
    Returns:
        (objects (B, K, D), present (B, K) bool); an absent cluster's row is 0.
    """
    count = assign.sum(dim=1)  # (B, K)
    objects = torch.einsum("bnd,bnk->bkd", tokens, assign.to(tokens.dtype)) / count.clamp_min(1.0)[..., None]
    return objects, count > 0


# ----------------------------------------------------------------------------------------------------------------
# Cross-image nearest neighbours


@torch.no_grad()
def cycle_consistent_nn(queries: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor, bank_valid: torch.Tensor,
                        partners: torch.Tensor, partners_valid: torch.Tensor, own: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbours in a memory bank that survive CrIBo's cycle check (cosine similarity throughout).

    Query q (an object of view a) -> its nearest valid entry j of ``bank_a`` -> ``bank_b[j]`` (the same past
    object seen in view b) -> its nearest valid object among ``partners`` (view-b objects of every image of the
    batch); q is kept iff that is ``partners[own[q]]``, q's own view-b object.

    Args:
        queries: (M, D); bank_a, bank_b: (Q, D); bank_valid: (Q,) bool.
        partners: (P, D); partners_valid: (P,) bool; own: (M,) int64 index of each query's own partner.
    Returns:
        (nn (M,) int64 index into the bank, keep (M,) bool); keep is all False when the bank is empty.
    """
    q = F.normalize(queries.float(), dim=-1)
    a, b = F.normalize(bank_a.float(), dim=-1), F.normalize(bank_b.float(), dim=-1)
    p = F.normalize(partners.float(), dim=-1)
    neg = torch.tensor(float("-inf"), device=q.device)
    nn_idx = torch.where(bank_valid[None, :], q @ a.T, neg).argmax(dim=1)  # (M,)
    back = torch.where(partners_valid[None, :], b[nn_idx] @ p.T, neg).argmax(dim=1)  # (M,)
    keep = (back == own) & bank_valid.any()
    return nn_idx, keep
