from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data beside the checkout; DENSEKIT_SHARED_DATA overrides. Users of densekit do not have
# it, so every test that needs it skips cleanly when it is absent.
SHARED_DATA = Path(os.environ.get("DENSEKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def davis2016_mini(shared_data: Path) -> Path:
    root = shared_data / "davis2016-mini"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """pytest -n 2 runs two workers on two cores: one intra-op thread each, or training steps run many
    times slower from oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
