"""Small DDP helpers (single node, torchrun env vars, gloo on CPU / nccl on GPU).

All helpers are identities when torch.distributed is not initialised, so objectives call them unconditionally.
``gather_with_grad`` follows the usual "all_gather with autograd" pattern (as in solo-learn / lightly's
``GatherLayer``): forward concatenates every rank's tensor along dim 0; backward all-reduces (sums) the incoming
gradient and returns this rank's slice. With the trainer's convention that DDP averages parameter gradients over
ranks (``loss`` is a per-rank mean), a loss computed from gathered tensors then yields the same gradients as one
process on the whole global batch.

Variable counts (CrIBo's valid centroids, DropPos's dropped-position tokens, DetCon's matched masks) break a per-rank
mean: :func:`global_mean` normalises by the count summed over ranks instead. State whose number of items varies per
image lives in fixed shapes with a validity mask (:class:`MaskedQueue`), so ``concat_all_gather`` still applies.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torchdist
from torch import nn


def is_distributed() -> bool:
    """True when torch.distributed is available and initialised with more than zero ranks."""
    return torchdist.is_available() and torchdist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return torchdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return torchdist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` from torchrun (0 when absent)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_requests_distributed() -> bool:
    """True when launched by torchrun (or similar) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from torchrun env vars if WORLD_SIZE > 1.

    Uses nccl for CUDA devices, gloo otherwise. Returns True when a group is (now) initialised.
    """
    if is_distributed():
        return True
    if not env_requests_distributed():
        return False
    backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
    torchdist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    """Barrier when distributed, no-op otherwise."""
    if is_distributed():
        torchdist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums gradients over ranks and returns the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ws = torchdist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(ws)]
        torchdist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        n = [int(s.item()) for s in sizes]
        if len(set(n)) != 1:
            raise ValueError(f"gather_with_grad needs equal local batch sizes, got {n}")
        out = [torch.empty_like(x) for _ in range(ws)]
        torchdist.all_gather(out, x.contiguous())
        ctx.rank = torchdist.get_rank()
        ctx.local = x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        # Every rank's loss used every rank's slice: the total gradient w.r.t. our slice is the sum over ranks.
        torchdist.all_reduce(grad, op=torchdist.ReduceOp.SUM)
        start = ctx.rank * ctx.local
        return grad[start : start + ctx.local]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (world*B, ...), differentiable.

    Rank r's rows sit at ``[r*B, (r+1)*B)``. Identity when not distributed. Local batch sizes must be equal.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 without gradient (queue keys). Identity alone."""
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    torchdist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (no grad; returns a new tensor). Identity (detached copy) alone."""
    y = x.detach().clone()
    if not is_distributed() or world_size() == 1:
        return y
    torchdist.all_reduce(y, op=torchdist.ReduceOp.SUM)
    return y / world_size()


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (no grad; returns a new tensor). Identity (detached copy) alone."""
    y = x.detach().clone()
    if not is_distributed() or world_size() == 1:
        return y
    torchdist.all_reduce(y, op=torchdist.ReduceOp.SUM)
    return y


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` (no-op alone)."""
    if is_distributed() and world_size() > 1:
        torchdist.broadcast(x, src=src)
    return x


def global_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted mean of ``values`` over the GLOBAL batch, as this rank's share of the loss.

    Returns ``world_size * sum(w * v) / all_reduce_sum(sum(w))`` (``w`` = 1 when ``weights`` is None): DDP averages
    gradients over ranks, so the average of these per-rank values - and of their gradients - is the single-process
    ``sum_all(w v) / sum_all(w)``, whatever the number of valid items on each rank. The count carries no gradient.
    Zero total weight gives 0 (still attached to the graph, so backward works and gives zero gradients).

    Args:
        values: any shape, with gradient (e.g. per-centroid cross-entropies).
        weights: same shape (or broadcastable): a bool validity mask or float weights, no gradient.
    """
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype).expand_as(values)
    total = all_reduce_sum(w.detach().sum())
    return (values * w).sum() * world_size() / total.clamp_min(torch.finfo(total.dtype).tiny)


class MaskedQueue(nn.Module):
    """A FIFO memory bank of fixed-shape items with a validity mask, filled with the global batch in rank order.

    Items that hold a variable number of entries (e.g. up to K object centroids per image) are padded to
    ``item_shape`` and carry a bool mask of ``mask_shape`` (True = a real entry), so every rank pushes equal
    shapes through :func:`concat_all_gather` and the bank is the same on every rank (no buffer broadcast needed).

    Args:
        size: Q, number of items (e.g. images) the bank holds.
        item_shape: shape of one item, e.g. ``(K, D)`` or CrIBo's ``(2, K, D)`` (both views).
        mask_shape: shape of one item's mask, e.g. ``(K,)``; default ``item_shape[:-1]``.
        dtype: of the items (the mask is bool).

    Buffers (in ``state_dict``, so resume restores the bank): ``items`` (Q, *item_shape), zeros until written;
    ``valid`` (Q, *mask_shape) bool, False until written; ``ptr`` () long, the next row to write; ``pushed`` ()
    long, how many items were ever pushed (``full`` once it reaches Q).
    """

    def __init__(self, size: int, item_shape: tuple[int, ...], mask_shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        item_shape = tuple(int(d) for d in item_shape)
        mask_shape = item_shape[:-1] if mask_shape is None else tuple(int(d) for d in mask_shape)
        self.register_buffer("items", torch.zeros((int(size), *item_shape), dtype=dtype))
        self.register_buffer("valid", torch.zeros((int(size), *mask_shape), dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.items.shape[0])

    @property
    def full(self) -> bool:
        """Every row has been written at least once."""
        return int(self.pushed) >= self.size

    @torch.no_grad()
    def push(self, items: torch.Tensor, valid: torch.Tensor) -> None:
        """Append this rank's ``items`` (B, *item_shape) and ``valid`` (B, *mask_shape), gathered over ranks (all
        ranks' rows, rank 0 first), overwriting the oldest rows; a global batch larger than Q keeps its last Q.
        Call it from ``on_step_end`` (every rank, same B)."""
        if tuple(items.shape[1:]) != tuple(self.items.shape[1:]) or tuple(valid.shape[1:]) != tuple(self.valid.shape[1:]):
            raise ValueError(f"push expects items (B, {tuple(self.items.shape[1:])}) and valid "
                             f"(B, {tuple(self.valid.shape[1:])}), got {tuple(items.shape)} and {tuple(valid.shape)}")
        items = concat_all_gather(items.detach().to(self.items.dtype))
        valid = concat_all_gather(valid.detach().to(torch.uint8)).bool()  # gloo has no bool all_gather
        n = items.shape[0]
        if n > self.size:
            items, valid = items[n - self.size :], valid[n - self.size :]
        m = items.shape[0]
        idx = (int(self.ptr) + torch.arange(m, device=self.items.device)) % self.size
        self.items[idx] = items.to(self.items.device)
        self.valid[idx] = valid.to(self.valid.device)
        self.ptr.fill_((int(self.ptr) + m) % self.size)
        self.pushed.add_(n)


def ddp_buffer_kwargs(sync: bool) -> dict[str, bool]:
    """DDP keyword for syncing buffers at every forward: ``forward_sync_buffers`` on torch versions that
    deprecate ``broadcast_buffers`` (buffers are still synced once at construction there, which is harmless:
    every rank builds the same initial state), ``broadcast_buffers`` before."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": bool(sync)}
    return {"broadcast_buffers": bool(sync)}
