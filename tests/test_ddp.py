"""DDP equivalence: 2 CPU processes (gloo) on one global batch == 1 process, for gathered-negative losses.

One ``torch.multiprocessing.spawn`` of 2 ranks does two things, compared against single-process runs here:

1. Gradients: :class:`test_trainer.TinyDense` (global InfoNCE whose negatives are the whole global batch via
   ``dist.gather_with_grad``, plus a dense term) wrapped in DDP, each rank on its half of a fixed global batch;
   the averaged DDP gradients must equal (allclose 1e-5) the gradients of one process on the whole batch.
   The same with ``gather=False`` (negatives from the local half only) must NOT match: the check has teeth.
2. The trainer: 2 steps of ``Trainer.fit`` under DDP (data split by rank, queue pushed with
   ``concat_all_gather``) end with the same weights and queue as a 1-process run. With SGD: the update is
   linear in the gradient, so the float-order noise of DDP's averaging stays at that level (AdamW's first steps
   are ~lr * sign(g), which turns that noise into 1e-5 jumps on near-zero gradients and made this flaky);
   the weights move by ~1e-2, a thousand times the tolerance.

Why a backbone without BatchNorm: in training mode BN normalises with the statistics of the batch it sees,
i.e. per process the local half, so per-process BN makes the forward itself (and hence the gradients) differ
from a single process on the full batch by design, not because of a bug (SyncBatchNorm fixes that, on CUDA
only). The equivalence under test is the one of the gathering helpers and of the data sharding.
Also ``drop=0``: TinyDense's random position dropout draws from each rank's own torch RNG stream.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from densekit.train import dist

pytestmark = pytest.mark.slow

WORLD = 2
GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {"view1": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
            "view2": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)}


def _objective(gather: bool = True):  # noqa: ANN202
    from test_trainer import TinyDense, tiny_backbone

    obj = TinyDense(tiny_backbone(norm=False, seed=0), drop=0.0)
    if not gather:
        obj.forward = _local_forward(obj)  # type: ignore[method-assign]
    return obj


def _local_forward(obj):  # noqa: ANN001, ANN202
    """TinyDense.forward with the gather disabled (what a DDP-naive loss would do)."""
    real = dist.gather_with_grad

    def forward(batch):  # noqa: ANN001, ANN202
        dist.gather_with_grad = lambda x: x  # type: ignore[assignment]
        try:
            return type(obj).forward(obj, batch)
        finally:
            dist.gather_with_grad = real

    return forward


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ranked_grads(rank: int, gather: bool) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    obj = _objective(gather)
    ddp = DDP(obj, find_unused_parameters=False, **dist.ddp_buffer_kwargs(False))
    local = GLOBAL_BATCH // WORLD
    batch = {k: v[rank * local : (rank + 1) * local] for k, v in _batch().items()}
    ddp(batch)["loss"].backward()
    return _grads(obj)


def _worker(rank: int, port: int, out: str, data: str) -> None:
    import torch.distributed as td
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    td.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert dist.is_distributed() and dist.world_size() == WORLD and dist.rank() == rank
        g_on = _ranked_grads(rank, gather=True)
        g_off = _ranked_grads(rank, gather=False)
        if rank == 0:
            save_file(g_on, os.path.join(out, "grads_gather.safetensors"))
            save_file(g_off, os.path.join(out, "grads_local.safetensors"))
        from test_trainer import TinyDense, tiny_backbone_nobn

        from densekit.train.trainer import Trainer

        Trainer(_train_cfg(data, os.path.join(out, "run2")), objective_cls=TinyDense,
                backbone_fn=tiny_backbone_nobn).fit()
    finally:
        td.destroy_process_group()


def _train_cfg(data: str, out: str):  # noqa: ANN202
    from densekit.train.config import build_config

    return build_config(
        overrides=["max_steps=2", f"batch_size={GLOBAL_BATCH}", "data.size=[32,32]", "data.gap_max=3",
                   "data.num_workers=0", "progress=false", "tensorboard=false", "hparams.drop=0.0",
                   "optim.name=sgd", "optim.lr=0.05", "optim.warmup_steps=0", "log_every=1"],
        objective="tinydense", backbone="tiny", out=out, data_path=data,
    )


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import torch.multiprocessing as mp

    from densekit.serve.sample import make_sample

    root = tmp_path_factory.mktemp("ddp")
    data = make_sample(root / "sample", sequences=2, frames=6, height=64, width=64, seed=0)
    mp.spawn(_worker, args=(_free_port(), str(root), str(data)), nprocs=WORLD, join=True)
    return root, data


def test_gather_with_grad_gives_single_process_gradients(spawned: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    root, _ = spawned
    torch.manual_seed(0)
    single = _objective()
    single(_batch())["loss"].backward()
    ref = _grads(single)
    ddp = load_file(str(root / "grads_gather.safetensors"))
    assert ref.keys() == ddp.keys() and len(ref) >= 6
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # Without the gather, the negatives are only the local half: the gradients differ.
    naive = load_file(str(root / "grads_local.safetensors"))
    assert any(not torch.allclose(naive[k], ref[k], rtol=1e-5, atol=1e-5) for k in ref)


def test_trainer_two_processes_match_one(spawned: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from test_trainer import TinyDense, tiny_backbone_nobn

    from densekit.train.trainer import Trainer

    root, data = spawned
    Trainer(_train_cfg(str(data), str(tmp_path / "run1")), objective_cls=TinyDense,
            backbone_fn=tiny_backbone_nobn).fit()
    one = load_file(str(tmp_path / "run1" / "state.safetensors"))
    two = load_file(str(root / "run2" / "state.safetensors"))
    model_keys = [k for k in one if k.startswith("model.")]
    assert model_keys and set(model_keys) == {k for k in two if k.startswith("model.")}
    init = tiny_backbone_nobn(_train_cfg(str(data), "x")).state_dict()
    assert not torch.equal(one["model.backbone.body.0.weight"], init["body.0.weight"])  # it trained
    for k in model_keys:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert int(two["model.queue_ptr"]) == 2 * GLOBAL_BATCH
