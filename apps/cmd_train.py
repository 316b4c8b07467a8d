"""``densekit train``: train a dense backbone with a self-supervised objective (see densekit.train.trainer).

Typer only at import time; torch and the trainer are imported inside the command so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densekit.serve.errors import DensekitError

HELP = (
    "Train a dense backbone with a self-supervised objective on your videos or images.\n\n"
    "Settings come from the defaults, then --config cfg.yaml, then the flags, then KEY=VALUE overrides "
    "(e.g. optim.lr=3e-4 data.size=[224,224] hparams.temperature=0.2 max_steps=20000). "
    "RUN_DIR gets config.yaml (the full resolved config), state.safetensors (everything needed to resume), "
    "backbone.safetensors (the trained backbone, loadable by every other command), log.jsonl and tb/ "
    "(TensorBoard). For several processes: torchrun --nproc_per_node N $(which densekit) train ..."
)


#: the upper bound on the schedule of a ``--minutes`` run that sets no max_steps itself
BUDGET_MAX_STEPS = 1_000_000


def _budget_overrides(minutes: Optional[float], clock: Optional[str], config: Optional[Path],
                      overrides: list[str]) -> list[str]:
    """``--minutes`` / ``--clock`` as config overrides; with ``--minutes`` and no max_steps from the config file
    or an override, the budget alone sets the schedule length."""
    import math

    out = []
    if clock is not None:
        if clock not in ("cpu", "wall"):
            raise DensekitError(f"--clock must be cpu or wall, got {clock!r}")
        out.append(f"clock={clock}")
    if minutes is None:
        return out
    if not math.isfinite(minutes) or minutes <= 0:
        raise DensekitError(f"--minutes must be a positive number, got {minutes:g}")
    out.append(f"budget_s={minutes * 60.0}")
    from densekit.train.config import load_yaml

    in_file = config is not None and "max_steps" in load_yaml(config)  # a path or a shipped config's name
    if not in_file and not any(o.split("=", 1)[0].strip() == "max_steps" for o in overrides):
        out.append(f"max_steps={BUDGET_MAX_STEPS}")
    return out


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command("train", help=HELP)
    def train(
        overrides: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE config overrides.", show_default=False)] = None,
        objective: Annotated[Optional[str], typer.Option("--objective", help="Objective name (poodle, densecl, vicregl, hiergroup, cribo, detcon, selfpatch, droppos) or module:Class; CPU-sized configs in densekit/train/configs/.")] = None,
        backbone: Annotated[Optional[str], typer.Option("--backbone", help="resnet18 | resnet50 | efficientnet_lite0 | timm:<name> | a .safetensors checkpoint to start from.")] = None,
        data: Annotated[Optional[Path], typer.Option("--data", help="DAVIS root, folder of videos, folder of frame folders, or folder of images.")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (created).")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="YAML config file (same keys as RUN_DIR/config.yaml), or the name of a shipped one (e.g. hiergroup_finetune_lite0; see densekit/train/configs/).")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last state checkpoint.")] = False,
        minutes: Annotated[Optional[float], typer.Option("--minutes", help="Time budget: the trainer sizes its schedule to end with it and stops when it is spent (max_steps is then only an upper bound). Counted on --clock; building the model counts.", show_default=False)] = None,
        clock: Annotated[Optional[str], typer.Option("--clock", help="What --minutes (budget_s) counts: cpu (default; CPU time of the training process and its data workers, steady on a shared machine) or wall.", show_default=False)] = None,
    ) -> None:
        import logging

        from densekit.train.config import build_config

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if out is None:
            raise DensekitError("no output directory: pass --out RUN_DIR")
        from densekit.train.trainer import check_run_dir

        check_run_dir(out)  # an existing file there is one line now, not after the model is built
        base = None
        if resume:
            from densekit.train.trainer import load_run_config

            base = load_run_config(out)
        elif objective is None and config is None:
            raise DensekitError("no objective: pass --objective NAME (or a --config that names one)")
        elif data is None:
            raise DensekitError("no training data: pass --data PATH")
        overrides = list(overrides or []) + _budget_overrides(minutes, clock, config, overrides or [])
        cfg = build_config(config, overrides, base=base, objective=objective, backbone=backbone,
                           out=str(out), data_path=str(data) if data is not None else None)
        if not cfg.objective:
            raise DensekitError(f"no objective: {config} names none; pass --objective NAME")

        from densekit.train.trainer import Trainer, get_objective_class

        evaluator = None
        if cfg.eval.davis:
            from densekit.retrieval.backbone_eval import check_eval_config
            from densekit.retrieval.backbone_eval import davis_jf_for_config as evaluator

            check_eval_config(cfg.eval)  # an unlabelled root fails now, not after the training it would score
        trainer = Trainer(cfg, resume=resume, objective_cls=get_objective_class(cfg.objective), evaluator=evaluator)
        result = trainer.fit()
        import os

        if int(os.environ.get("RANK", "0")) == 0:  # the process group is already closed here
            where = Path(cfg.out)
            if result.halted:
                typer.echo(f"halted at step {result.step}; resume with: densekit train --out {where} --resume")
            else:
                budget = ""
                if result.budget_s:
                    why = "the budget ran out" if result.stopped_by_budget else "the schedule ended"
                    budget = (f"; {result.seconds:.0f} s of {result.clock} clock of a {result.budget_s:.0f} s "
                              f"budget ({why}), {result.wall_s:.0f} s wall")
                typer.echo(
                    f"trained {result.step} steps ({result.images_per_s:.1f} samples/s){budget}; "
                    f"backbone: {where / 'backbone.safetensors'}"
                )
