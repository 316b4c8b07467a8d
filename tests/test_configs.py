"""Every CPU config shipped in train/configs (the README's training commands) resolves, names a registered
objective, and builds its model: a typo in a key or an hparam fails here, not on a user's laptop."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml"))


def test_every_objective_has_a_config() -> None:
    from densekit.train.config import build_config
    from densekit.train.trainer import available_objectives

    named = {build_config(p).objective for p in CONFIGS}
    assert set(available_objectives()) <= named, set(available_objectives()) - named


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model_within_a_cpu_budget(path: Path, tmp_path: Path) -> None:
    from densekit.train.config import build_config
    from densekit.train.trainer import Trainer, get_objective_class

    cfg = build_config(path, out=str(tmp_path / "run"), data_path=str(tmp_path))
    assert cfg.clock == "cpu" and 0 < cfg.budget_s <= 30 * 60, (cfg.clock, cfg.budget_s)  # laptop-sized
    trainer = Trainer(cfg, objective_cls=get_objective_class(cfg.objective))
    model = trainer._build_objective()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert model.name == cfg.objective


def test_a_shipped_config_loads_by_name() -> None:
    from densekit.serve.errors import DensekitError
    from densekit.train.config import build_config, shipped_configs

    assert shipped_configs() == [p.stem for p in CONFIGS]  # the installed folder is the repo's
    for name in ("hiergroup_finetune_lite0", "hiergroup_finetune_lite0.yaml"):
        assert build_config(name) == build_config(CONFIGS[[p.stem for p in CONFIGS].index("hiergroup_finetune_lite0")])
    with pytest.raises(DensekitError, match="shipped configs: .*hiergroup_resnet18"):
        build_config("no_such_recipe")
