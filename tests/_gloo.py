"""Gloo process groups on loopback for the tests that check N processes give one process's gradients."""

from __future__ import annotations

import os
import socket
from typing import Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable[[int, int, str], None], port: int, world: int, out: str) -> None:
    import torch
    import torch.distributed as td

    torch.set_num_threads(1)  # ranks share the machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, out)
    finally:
        td.destroy_process_group()


def run_ranks(fn: Callable[[int, int, str], None], out: str, world: int = 2) -> None:
    """Run ``fn(rank, world, out)`` in ``world`` processes joined in one gloo group; ``fn`` must be a
    module-level function (it is pickled into the spawned processes) and writes what it measured under
    ``out``."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(fn, _free_port(), world, out), nprocs=world, join=True)
