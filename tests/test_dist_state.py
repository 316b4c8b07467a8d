"""Fixed-shape variable-count state and global-count normalisation (train/dist.py: MaskedQueue, global_mean).

The 1 == N checks spawn 2 gloo processes: each pushes its half of a global batch into a MaskedQueue and computes
a masked mean loss with a different number of valid items per rank; the bank must equal one process pushing the
whole batch, and the rank-averaged gradients (what DDP applies) must equal the single-process gradient. A
per-rank mean (the naive normalisation) must not match: the check has teeth. DINOLoss's centre, updated from each
rank's valid rows, must be the centre of one process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from densekit.train import dist
from densekit.train.dist import MaskedQueue, global_mean

GLOBAL = 4


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    items = torch.randn(GLOBAL, 3, 2, generator=g)  # (B, K, D)
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)  # 4 valid vs 2 per half
    values = torch.randn(GLOBAL, 3, generator=g)
    return items, valid, values


def test_masked_queue_is_a_fifo_with_validity_and_round_trips(tmp_path: Path) -> None:
    q = MaskedQueue(5, (3, 2))
    assert q.items.shape == (5, 3, 2) and q.valid.shape == (5, 3) and q.valid.dtype == torch.bool
    assert not q.valid.any() and not q.full
    items, valid, _ = _data()
    q.push(items, valid)
    assert torch.equal(q.items[:4], items) and torch.equal(q.valid[:4], valid) and int(q.ptr) == 4
    q.push(items[:3] + 10, valid[:3])  # wraps: rows 4, 0, 1
    assert torch.equal(q.items[4], items[0] + 10) and torch.equal(q.items[:2], items[1:3] + 10)
    assert torch.equal(q.items[2:4], items[2:4]) and int(q.ptr) == 2 and q.full and int(q.pushed) == 7
    big = torch.arange(7 * 6, dtype=torch.float32).reshape(7, 3, 2)
    q.push(big, torch.ones(7, 3, dtype=torch.bool))  # more than Q: the last Q rows stay
    assert sorted(q.items[:, 0, 0].tolist()) == sorted(big[2:, 0, 0].tolist())
    from safetensors.torch import load_file, save_file

    save_file(dict(q.state_dict()), str(tmp_path / "q.safetensors"))
    q2 = MaskedQueue(5, (3, 2))
    q2.load_state_dict(load_file(str(tmp_path / "q.safetensors")), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), q2.state_dict().values()))
    with pytest.raises(ValueError, match="push expects"):
        q.push(torch.zeros(2, 4, 2), torch.zeros(2, 4, dtype=torch.bool))


def test_global_mean_alone_is_the_masked_mean() -> None:
    _, valid, values = _data()
    v = values.clone().requires_grad_(True)
    out = global_mean(v, valid)
    torch.testing.assert_close(out, values[valid].mean())
    out.backward()
    assert torch.equal(v.grad == 0, ~valid)
    zero = global_mean(v, torch.zeros_like(valid))
    assert float(zero.detach()) == 0.0
    zero.backward()  # still differentiable


# -- 2 processes ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _centre(teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """DINOLoss's centre after one update from (B, K) teacher rows of which ``valid`` count."""
    from densekit.train.losses import DINOLoss

    loss = DINOLoss(out_dim=teacher.shape[-1], center_momentum=0.5)
    loss.update_center(teacher, valid.any(dim=1))
    return loss.center.clone()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        items, valid, values = _data()
        half = slice(rank * GLOBAL // 2, (rank + 1) * GLOBAL // 2)
        q = MaskedQueue(6, (3, 2))
        q.push(items[half], valid[half])
        res: dict[str, torch.Tensor] = {f"q.{k}": v.clone() for k, v in q.state_dict().items()}
        for name, fn in (("global", lambda v, m: global_mean(v, m)),
                         ("local", lambda v, m: (v * m).sum() / m.sum().clamp_min(1))):
            v = values[half].clone().requires_grad_(True)
            fn(v, valid[half]).backward()
            full = torch.zeros(GLOBAL, 3)
            full[half] = v.grad
            # DDP averages parameter gradients over ranks; here the "parameters" are the values themselves
            res[f"grad.{name}"] = dist.all_reduce_sum(full) / 2
        res["center"] = _centre(values[half], valid[half])
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    items, valid, values = _data()
    one = MaskedQueue(6, (3, 2))
    one.push(items, valid)
    v = values.clone().requires_grad_(True)
    global_mean(v, valid).backward()
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for k, t in one.state_dict().items():
            assert torch.equal(res[f"q.{k}"], t), k  # same bank on every rank, in rank order
        torch.testing.assert_close(res["grad.global"], v.grad, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(res["grad.local"], v.grad, atol=1e-3)  # per-rank means are not 1 == N
        torch.testing.assert_close(res["center"], _centre(values, valid), rtol=1e-6, atol=1e-7)
