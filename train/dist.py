"""Small DDP helpers (single node, torchrun env vars, gloo on CPU / nccl on GPU).

All helpers are identities when torch.distributed is not initialised, so objectives call them unconditionally.
``gather_with_grad`` follows the usual "all_gather with autograd" pattern (as in solo-learn / lightly's
``GatherLayer``): forward concatenates every rank's tensor along dim 0; backward all-reduces (sums) the incoming
gradient and returns this rank's slice. With the trainer's convention that DDP averages parameter gradients over
ranks (``loss`` is a per-rank mean), a loss computed from gathered tensors then yields the same gradients as one
process on the whole global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torchdist


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


def ddp_buffer_kwargs(sync: bool) -> dict[str, bool]:
    """DDP keyword for syncing buffers at every forward: ``forward_sync_buffers`` on torch versions that
    deprecate ``broadcast_buffers`` (buffers are still synced once at construction there, which is harmless:
    every rank builds the same initial state), ``broadcast_buffers`` before."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": bool(sync)}
    return {"broadcast_buffers": bool(sync)}
