"""Loss terms as standalone typed modules, composed by the objectives (lightly's ``loss/`` in spirit).

* VICReg (Bardes, Ponce and LeCun, ICLR 2022) and VICRegL (NeurIPS 2022; the official ``main_vicregl.py`` was
  read for the structure): :class:`InvarianceLoss`, :class:`VarianceLoss`, :class:`CovarianceLoss`,
  :class:`VICRegLoss`, :class:`VICRegLLocalLoss`. Embeddings are (N, C) (one vector per sample) or (N, k, C)
  (k matched local features per sample): statistics are taken over N, the batch, and for (N, k, C) separately
  for each of the k slots, then averaged over them.
* InfoNCE (van den Oord et al. 2018; He et al., MoCo, CVPR 2020), on L2-normalised embeddings with cosine logits
  over a temperature and the positive as class 0: :class:`InfoNCELoss`, :class:`GlobalInfoNCELoss` (MoCo),
  :class:`DenseInfoNCELoss` (DenseCL's dense term), :class:`PixelContrastLoss` (hiergroup).
* BYOL (Grill et al., NeurIPS 2020) and PooDLe (Wang et al., ICLR 2025): :class:`BYOLLoss`,
  :class:`FlowEquivarianceLoss`.
* DINO (Caron et al., ICCV 2021; the loss CrIBo and SelfPatch build on): :class:`DINOLoss` (sharpened, centred
  teacher softmax vs student log-softmax, centre EMA, teacher-temperature warm-up), :func:`dino_cross_entropy`,
  :func:`teacher_temperature`; and Sinkhorn-Knopp balanced assignments (:func:`sinkhorn_knopp`, SwAV/CrIBo).
  Both run as fp32 islands under autocast (:func:`fp32`): a softmax over 65536 prototypes and ``exp(-20 M)``
  underflow in fp16.

Batch statistics and negatives span the global batch through :mod:`densekit.train.dist`, so DDP matches one
process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.errors import DensekitError
from densekit.train.dist import all_reduce_sum, gather_with_grad, rank, world_size
from densekit.train.flow import OCC_ALPHA1, OCC_ALPHA2, apply_affine, identity_grid, inside, occlusion_mask


# ----------------------------------------------------------------------------------------------------
# VICReg / VICRegL
# ----------------------------------------------------------------------------------------------------


def _need_batch(n: int) -> None:
    if n < 2:
        raise DensekitError("vicregl needs a global batch of at least 2 (variance/covariance are batch statistics)")


def off_diagonal_sq_sum(c: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal entries over the last two dims: (..., C, C) -> (...)."""
    return c.pow(2).sum(dim=(-2, -1)) - torch.diagonal(c, dim1=-2, dim2=-1).pow(2).sum(-1)


class InvarianceLoss(nn.Module):
    """Mean squared error between two embeddings of the same content: (N, [k,] C) x2 -> scalar."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x, y)


class VarianceLoss(nn.Module):
    """Hinge on the per-dimension batch std: mean over dimensions of ``relu(1 - sqrt(var + eps))``.

    ``forward(x)``: (N, C) or (N, k, C) -> scalar; zero when every dimension's std over N is >= 1 (up to eps).
    ``center=False`` takes x as already centred over N (:class:`VICRegLoss` centres once for both terms).
    """

    def __init__(self, eps: float = 1e-4, center: bool = True) -> None:
        super().__init__()
        self.eps, self.center = float(eps), bool(center)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _need_batch(x.shape[0])
        if self.center:
            x = x - x.mean(dim=0)
        return F.relu(1.0 - torch.sqrt(x.var(dim=0) + self.eps)).mean()


class CovarianceLoss(nn.Module):
    """Sum of squared off-diagonal entries of the batch covariance, divided by the dimension C.

    ``forward(x)``: (N, C) -> scalar; (N, k, C) -> the mean over the k slots of each slot's value. Zero for
    decorrelated dimensions. ``center=False`` takes x as already centred over N.
    """

    def __init__(self, center: bool = True) -> None:
        super().__init__()
        self.center = bool(center)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _need_batch(x.shape[0])
        if self.center:
            x = x - x.mean(dim=0)
        if x.dim() == 2:
            return off_diagonal_sq_sum(x.T @ x / (x.shape[0] - 1)) / x.shape[1]
        xk = x.permute(1, 0, 2)  # (k, N, C)
        cov = xk.transpose(1, 2) @ xk / (xk.shape[1] - 1)  # (k, C, C)
        return (off_diagonal_sq_sum(cov) / xk.shape[2]).mean()


class VICRegLoss(nn.Module):
    """VICReg on two embeddings of the same samples, coefficients applied.

    ``forward(x, y)``: (N, [k,] C) each -> ``{"inv", "var", "cov"}`` scalars: ``inv_coeff`` x invariance (on
    this process's samples), ``var_coeff`` x the mean of both views' variance terms and ``cov_coeff`` x the mean
    of their covariance terms, those two over the global batch (:func:`densekit.train.dist.gather_with_grad`,
    so DDP matches one process; ``gather=False`` keeps them local).
    """

    def __init__(self, inv_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, gather: bool = True) -> None:
        super().__init__()
        self.inv_coeff, self.var_coeff, self.cov_coeff = float(inv_coeff), float(var_coeff), float(cov_coeff)
        self.gather = bool(gather)
        self.invariance = InvarianceLoss()
        self.variance, self.covariance = VarianceLoss(eps, center=False), CovarianceLoss(center=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        inv = self.invariance(x, y)
        var, cov = [], []
        for t in (x, y):
            t = gather_with_grad(t) if self.gather else t
            _need_batch(t.shape[0])
            t = t - t.mean(dim=0)  # once for both terms: one graph node, one gradient sum
            var.append(self.variance(t))
            cov.append(self.covariance(t))
        var_t, cov_t = (var[0] + var[1]) / 2, (cov[0] + cov[1]) / 2
        return {"inv": self.inv_coeff * inv, "var": self.var_coeff * var_t, "cov": self.cov_coeff * cov_t}


def nearest_matches(distances: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every input position its nearest candidate; keep the ``k`` inputs whose nearest distance is smallest.

    Args:
        distances: (B, N, M) input-to-candidate distances.
        k: how many inputs to keep (None or >= N: all).
    Returns:
        (inputs, matches): (B, k) input indices in increasing (raster) order, as the official code's masked
        selection keeps them, and (B, k) the index of each one's nearest candidate.
    """
    nn_dist, nn_idx = distances.min(dim=2)
    n = distances.shape[1]
    if k is None or k >= n:
        inputs = torch.arange(n, device=distances.device).expand(distances.shape[0], n)
    else:
        inputs = nn_dist.topk(k, dim=1, largest=False).indices.sort(dim=1).values
    return inputs, nn_idx.gather(1, inputs)


def _select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, k) -> (B, k, C)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class VICRegLLocalLoss(nn.Module):
    """VICRegL's local loss for one ordered view pair (official ``_local_loss``).

    Feature-based matching (nearest neighbour in L2 between local embeddings) and location-based matching
    (nearest cell in frame coordinates), each in both directions (1 -> 2, 2 -> 1); each direction keeps its
    ``num_matches`` best matches (all of them for feature matching with ``l2_all_matches``) and applies
    :class:`VICRegLoss` to the matched pairs (statistics per match slot); halves are averaged.

    ``forward(m1, m2, loc1, loc2)``: local embeddings (B, N1, C), (B, N2, C) and cell locations (B, N1, 2),
    (B, N2, 2) -> ``{"inv_feat", "inv_loc", "var", "cov"}`` scalars, coefficients applied.
    """

    def __init__(self, num_matches: int = 20, l2_all_matches: bool = False, inv_coeff: float = 25.0,
                 var_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__()
        self.num_matches, self.l2_all_matches = int(num_matches), bool(l2_all_matches)
        self.vicreg = VICRegLoss(inv_coeff, var_coeff, cov_coeff, eps)

    def forward(self, m1: torch.Tensor, m2: torch.Tensor, loc1: torch.Tensor,
                loc2: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        var = m1.new_zeros(())
        cov = m1.new_zeros(())
        for kind in ("feat", "loc"):
            if kind == "feat":
                d12, d21 = torch.cdist(m1, m2), torch.cdist(m2, m1)
                k = None if self.l2_all_matches else self.num_matches
            else:
                d12, d21 = torch.cdist(loc1, loc2), torch.cdist(loc2, loc1)
                k = self.num_matches
            inv = m1.new_zeros(())
            for a, b, d in ((m1, m2, d12), (m2, m1, d21)):
                src, dst = nearest_matches(d.detach(), k)
                t = self.vicreg(_select(a, src), _select(b, dst))
                inv = inv + t["inv"] / 2
                var = var + t["var"] / 2
                cov = cov + t["cov"] / 2
            out[f"inv_{kind}"] = inv
        out["var"], out["cov"] = var, cov
        return out


# ----------------------------------------------------------------------------------------------------
# InfoNCE
# ----------------------------------------------------------------------------------------------------


class InfoNCELoss(nn.Module):
    """InfoNCE from cosine logits: ``forward(pos (M,), neg (M, K))`` -> mean over the M queries of
    ``-log(e^{pos/t} / (e^{pos/t} + sum_k e^{neg_k/t}))``. Falls as positives align and negatives spread."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


class GlobalInfoNCELoss(InfoNCELoss):
    """MoCo's loss: each query's own key is its positive, a queue of past keys the negatives.

    ``forward(q, k, queue)``: q, k (B, C) unit vectors, queue (C, K) unit columns -> scalar.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward((q * k).sum(1), q @ queue)


def dense_correspondence(q_feat: torch.Tensor, k_feat: torch.Tensor) -> torch.Tensor:
    """For each query location, the key location with the most similar feature (cosine).

    Args:
        q_feat, k_feat: (B, D, N) features at N locations.
    Returns:
        (B, N) long: index j in k for each i in q.
    """
    sim = torch.bmm(F.normalize(q_feat, dim=1).transpose(1, 2), F.normalize(k_feat, dim=1))  # (B, N, N)
    return sim.argmax(dim=2)


class DenseInfoNCELoss(InfoNCELoss):
    """DenseCL's dense term: every query location's positive is the key location it corresponds to
    (:func:`dense_correspondence` of the backbone features), negatives a queue (DenseCL: of pooled dense keys).

    ``forward(q_dense, k_dense, match, queue)``: q_dense, k_dense (B, C, N) unit vectors per location, match
    (B, N) key index per query location, queue (C, K) -> scalar (mean over the B * N locations).
    """

    def forward(self, q_dense: torch.Tensor, k_dense: torch.Tensor, match: torch.Tensor,  # type: ignore[override]
                queue: torch.Tensor) -> torch.Tensor:
        c = q_dense.shape[1]
        k_matched = torch.gather(k_dense, 2, match.unsqueeze(1).expand(-1, c, -1))
        # q_flat before pos: this order fixes how autograd sums q_dense's two gradients (bit-identical to before)
        q_flat = q_dense.transpose(1, 2).reshape(-1, c)  # (B*N, C)
        pos = (q_dense * k_matched).sum(1).reshape(-1)  # (B*N,)
        return super().forward(pos, q_flat @ queue)


def _take(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """z (B, C, N), idx (B, m) -> (B, m, C)."""
    return z.gather(2, idx[:, None, :].expand(-1, z.shape[1], -1)).transpose(1, 2)


class PixelContrastLoss(nn.Module):
    """Pixel contrast over sampled cells (Zhang and Maire, NeurIPS 2020), hiergroup's loss.

    For every valid anchor a (a cell of view 1) with its positive p (view 2), in-image negatives n_k (view 2) and
    cross-image negatives c_k (view 2 of other images of the global batch):
    ``loss_a = -log(e^{a.p/t} / (e^{a.p/t} + sum_k e^{a.n_k/t} + sum_k e^{a.c_k/t}))``, averaged over the valid
    anchors of the GLOBAL batch (so DDP's gradient averaging gives one process's gradient on the whole batch).

    ``forward(z1, z2, anchor, positive, negative, valid, neg_valid, cross_idx, cross_shift)``:
        z1, z2: (B, C, N) unit embeddings of the two views (N cells); anchor, positive: (B, n) cell indices;
        negative: (B, n, K); valid: (B, n) and neg_valid: (B, n, K) 1/0 masks; cross_idx, cross_shift:
        (B, n, cns) a cell of another image's view 2 and a random offset choosing that image.
    Returns ``{"loss", "pos_sim", "neg_sim", "anchors"}`` (mean positive / valid negative cosine, anchor count).
    """

    def __init__(self, temperature: float = 0.07, cross_negatives: bool = True) -> None:
        super().__init__()
        self.temperature, self.cross_negatives = float(temperature), bool(cross_negatives)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, anchor: torch.Tensor, positive: torch.Tensor,
                negative: torch.Tensor, valid: torch.Tensor, neg_valid: torch.Tensor, cross_idx: torch.Tensor,
                cross_shift: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, _ = z1.shape
        n, k = negative.shape[1], negative.shape[2]
        za = _take(z1, anchor)  # (B, n, C)
        zp = _take(z2, positive)
        zn = _take(z2, negative.reshape(b, n * k)).reshape(b, n, k, c)
        pos = (za * zp).sum(-1, keepdim=True) / self.temperature  # (B, n, 1)
        neg = torch.einsum("bnc,bnkc->bnk", za, zn) / self.temperature
        neg = neg.masked_fill(neg_valid <= 0, float("-inf"))
        logits = [pos, neg]
        if self.cross_negatives:
            zg = gather_with_grad(z2).transpose(1, 2)  # (G, N, C): every rank calls it, so DDP stays in step
            g = zg.shape[0]
            if g > 1:
                own = (rank() * b + torch.arange(b, device=z1.device)).view(b, 1, 1)
                other = (own + 1 + cross_shift % (g - 1)) % g  # never the image itself
                zc = zg[other, cross_idx]  # (B, n, cns, C)
                logits.append(torch.einsum("bnc,bnkc->bnk", za, zc) / self.temperature)
        per_anchor = torch.logsumexp(torch.cat(logits, dim=-1), dim=-1) - pos.squeeze(-1)  # (B, n)
        valid = valid.to(per_anchor.dtype)
        count = all_reduce_sum(valid.sum()).clamp_min(1.0)
        loss = (per_anchor * valid).sum() * world_size() / count
        with torch.no_grad():
            vsum = valid.sum().clamp_min(1.0)
            nv = neg_valid.to(neg.dtype)
            pos_sim = (pos.squeeze(-1) * valid).sum() * self.temperature / vsum
            neg_sim = (torch.nan_to_num(neg, neginf=0.0) * nv).sum() * self.temperature / nv.sum().clamp_min(1.0)
        return {"loss": loss, "pos_sim": pos_sim, "neg_sim": neg_sim, "anchors": valid.sum().detach()}


# ----------------------------------------------------------------------------------------------------
# BYOL / PooDLe
# ----------------------------------------------------------------------------------------------------


class BYOLLoss(nn.Module):
    """Squared L2 between L2-normalised vectors, averaged (= 2 - 2 cos): ``forward(online (N, C), target (N, C))``
    -> scalar in [0, 4]; 0 when each pair points the same way."""

    def forward(self, online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (F.normalize(online, dim=1) - F.normalize(target, dim=1)).pow(2).sum(dim=1).mean()


class FlowEquivarianceLoss(nn.Module):
    """PooDLe's masked dense loss between student features of frame a and teacher features of frame b.

    For each position p of frame a the student reads its view at theta_s(p) and the teacher reads its view at
    theta_t(p + fwd(p)); vectors are L2-normalised, the squared distance is summed over the mask (forward-backward
    occlusion test with ``alpha1``/``alpha2``, warp and both affines inside their frames) and divided by the mask
    area per image, then averaged over the batch.

    ``forward(student, teacher, fwd, bwd, theta_s, theta_t)``:
        student: (B, C, h, w) student output on the augmented view of frame a (any resolution);
        teacher: (B, C, h', w') teacher output on the augmented view of frame b;
        fwd, bwd: (B, 2, H, W) flows a -> b and b -> a between the unaugmented frames, in image pixels;
        theta_s, theta_t: (B, 2, 3) normalised affines, original frame a / b -> augmented view (see
        :func:`densekit.train.flow.affine_to_normalized`).
    Returns (loss scalar, mean mask coverage scalar). ``loss_stride`` evaluates on the (H / loss_stride,
    W / loss_stride) grid of frame a (1 = image resolution). Gradient reaches the student only.
    """

    def __init__(self, loss_stride: int = 1, alpha1: float = OCC_ALPHA1, alpha2: float = OCC_ALPHA2) -> None:
        super().__init__()
        self.loss_stride, self.alpha1, self.alpha2 = int(loss_stride), float(alpha1), float(alpha2)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor,
                theta_s: torch.Tensor, theta_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = fwd.shape
        with torch.no_grad():
            occ = occlusion_mask(fwd, bwd, self.alpha1, self.alpha2)
            if self.loss_stride > 1:
                fwd = F.avg_pool2d(fwd, self.loss_stride)
                occ = F.avg_pool2d(occ, self.loss_stride)
            lh, lw = fwd.shape[-2:]
            p = identity_grid(b, lh, lw, fwd.device, fwd.dtype)
            scale = torch.tensor([2.0 / w, 2.0 / h], device=fwd.device, dtype=fwd.dtype)
            q = p + fwd.permute(0, 2, 3, 1) * scale  # normalised flow: resolution independent
            grid_s = apply_affine(theta_s.to(fwd.dtype), p)
            grid_t = apply_affine(theta_t.to(fwd.dtype), q)
            mask = occ * inside(q) * inside(grid_s) * inside(grid_t)  # (B, 1, lh, lw)
            t = F.normalize(F.grid_sample(teacher.float(), grid_t, mode="bilinear", align_corners=False), dim=1)
        s = F.normalize(F.grid_sample(student.float(), grid_s, mode="bilinear", align_corners=False), dim=1)
        sq = (s - t).pow(2).sum(dim=1, keepdim=True) * mask
        loss = (sq.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) + 1e-7)).mean()
        return loss, mask.mean()


# ----------------------------------------------------------------------------------------------------
# fp32 islands, DINO, Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fp32() -> Iterator[None]:
    """Run a block with autocast off (CPU and CUDA), for losses that must not run in fp16/bf16 under the trainer's
    AMP: large softmaxes, Sinkhorn's exponentials, centring. Tensors made before the block keep their dtype: cast
    the inputs with ``.float()`` inside it (the losses here do)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over ``warmup_steps`` steps, then ``end``
    (a pure function of the step). ``warmup_steps <= 0`` gives ``end`` from step 0."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * step / warmup_steps)


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``-sum_k q_k log softmax(s / student_temp)_k`` per row, in fp32: (..., K), (..., K) -> (...)."""
    with fp32():
        logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        return -(teacher_probs.float() * logp).sum(dim=-1)


class DINOLoss(nn.Module):
    """DINO's self-distillation loss with centring and sharpening (fp32 inside).

    Teacher targets are ``softmax((t - center) / tau_t)`` (no gradient), student predictions
    ``log_softmax(s / tau_s)``; the loss is the cross-entropy averaged over samples and over the (teacher view,
    student view) pairs with different view indices (DINO skips the pairs where the student sees the teacher's own
    crop; teacher view i is student view i, so the global crops come first in the student views). ``tau_t`` warms
    up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_steps`` steps
    (:func:`teacher_temperature`; the caller passes the step, e.g. from a step buffer). After the loss, the centre
    moves toward the global-batch teacher mean: ``c <- m c + (1 - m) mean(t)`` with the mean over every rank's
    teacher rows (sums and counts all-reduced), so N processes keep the centre of one.

    ``forward(student, teacher, step)``: student (Vs, N, K) logits, teacher (Vt, N, K) logits, Vt <= Vs -> scalar.
    Buffer ``center`` (1, K).
    """

    def __init__(self, out_dim: int, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_steps: int = 0, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.teacher_temp, self.warmup_teacher_temp = float(teacher_temp), float(warmup_teacher_temp)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("center", torch.zeros(1, int(out_dim)))

    def teacher_temp_at(self, step: int) -> float:
        return teacher_temperature(step, self.warmup_steps, self.warmup_teacher_temp, self.teacher_temp)

    @torch.no_grad()
    def teacher_probs(self, teacher: torch.Tensor, step: int) -> torch.Tensor:
        """Centred, sharpened teacher softmax (fp32, no grad): (..., K) -> (..., K)."""
        with fp32():
            return F.softmax((teacher.float() - self.center) / self.teacher_temp_at(step), dim=-1)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """EMA of the centre toward the global mean of teacher rows ``teacher`` (..., K); ``valid`` (...) bool
        keeps only some rows (variable counts per rank, e.g. CrIBo's valid centroids); no valid row anywhere
        leaves the centre unchanged."""
        with fp32():
            rows = teacher.float().reshape(-1, teacher.shape[-1])
            w = torch.ones(rows.shape[0], device=rows.device) if valid is None else valid.reshape(-1).float()
            total = all_reduce_sum(w.sum())
            if float(total) == 0.0:
                return
            batch_center = all_reduce_sum((rows * w[:, None]).sum(0, keepdim=True)) / total
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, step: int, update_center: bool = True
                ) -> torch.Tensor:
        vs, vt = student.shape[0], teacher.shape[0]
        if vt > vs or student.shape[1:] != teacher.shape[1:]:
            raise ValueError(f"DINOLoss needs student (Vs, N, K) and teacher (Vt <= Vs, N, K), got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        q = self.teacher_probs(teacher, step)
        terms = [dino_cross_entropy(student[v], q[t], self.student_temp).mean()
                 for t in range(vt) for v in range(vs) if v != t]
        if not terms:  # one view on each side: the only pair is the same view
            terms = [dino_cross_entropy(student[0], q[0], self.student_temp).mean()]
        loss = torch.stack(terms).mean()
        if update_center:
            self.update_center(teacher)
        return loss


def sinkhorn_knopp(scores: torch.Tensor, n_iters: int = 3, eps: float = 0.05,
                   cluster_marginal: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced soft assignment of N items to K clusters by Sinkhorn-Knopp (SwAV; CrIBo's ``sinkhorn``), in fp32.

    ``P = exp(scores / eps)`` normalised to sum 1, then ``n_iters`` times: scale the rows (items) to sum 1/N, scale
    the columns (clusters) to sum ``cluster_marginal`` (default uniform 1/K). The result is a transport plan whose
    column sums are exactly the marginal and whose row sums approach 1/N, so every cluster gets its share of the
    items even when all items score one cluster highest (an arg-max would put them all there). A cost M is
    ``scores = -M`` (CrIBo: ``exp(-lambda M)`` is ``eps = 1 / lambda``). Rows scale by their maximum first, which
    changes nothing after the normalisations but keeps ``exp`` finite.

    Args:
        scores: (..., N, K) similarities, one problem per leading index (e.g. per image).
        n_iters: row/column normalisation rounds (CrIBo 5, SwAV 3).
        eps: entropic regularisation (temperature); smaller is harder.
        cluster_marginal: (..., K) column sums (positive, summing to 1), e.g. CrIBo's current cluster sizes.
    Returns:
        (..., N, K) float32 transport plan, no gradient. Multiply by N for per-item assignments summing to ~1.
    """
    with torch.no_grad(), fp32():
        s = scores.float() / float(eps)
        p = torch.exp(s - s.amax(dim=(-2, -1), keepdim=True))
        n, k = p.shape[-2], p.shape[-1]
        c = (torch.full(p.shape[:-2] + (k,), 1.0 / k, device=p.device) if cluster_marginal is None
             else cluster_marginal.float().expand(p.shape[:-2] + (k,)))
        tiny = torch.finfo(torch.float32).tiny
        p = p / p.sum(dim=(-2, -1), keepdim=True).clamp_min(tiny)
        for _ in range(int(n_iters)):
            p = p / (n * p.sum(dim=-1, keepdim=True).clamp_min(tiny))
            p = p * (c / p.sum(dim=-2).clamp_min(tiny)).unsqueeze(-2)
        return p


__all__ = [
    "BYOLLoss", "CovarianceLoss", "DenseInfoNCELoss", "FlowEquivarianceLoss", "GlobalInfoNCELoss", "InfoNCELoss",
    "InvarianceLoss", "PixelContrastLoss", "VICRegLLocalLoss", "VICRegLoss", "VarianceLoss", "dense_correspondence",
    "nearest_matches", "off_diagonal_sq_sum",
    "DINOLoss", "dino_cross_entropy", "fp32", "sinkhorn_knopp", "teacher_temperature",
]
