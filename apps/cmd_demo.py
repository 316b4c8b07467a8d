"""``densekit demo``: sample data -> training -> ONNX -> DAVIS J&F -> segment index -> report (densekit.apps.demo).

Typer only at import time; everything heavy is imported inside the command so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = (
    "The main job on the embedded default, end to end: make the sample dataset, fine-tune the ImageNet-pretrained "
    "EfficientNet-Lite0 on it for a few minutes (or train another backbone), export it to ONNX (parity-checked; TensorRT where a GPU is), score DAVIS J&F of the trained model "
    "beside the ImageNet-pretrained EfficientNet-Lite0 and the baselines (random init, pixels) on the sample's "
    "held-out split, build a segment index with the best model and search it, and write OUT/report.md with "
    "pictures. It ends by printing the command that opens the app on the results.\n\n"
    "Default: hiergroup (pixel contrast from a region hierarchy) fine-tuning efficientnet_lite0 with the recipe of "
    "train/configs/hiergroup_finetune_lite0.yaml (stem and first two stages frozen, the rest at a tenth of the heads' "
    "rate); --backbone resnet18 trains from scratch instead. --minutes counts CPU time of the training process "
    "(steady on a busy machine; --clock wall for the wall clock).\n\n"
    "Resumable: run it again on the same OUT and the steps already done are skipped (an interrupted training "
    "run continues from its last checkpoint); --force redoes everything."
)


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app`` (called by densekit.apps.cli)."""

    @app.command("demo", help=HELP)
    def demo(
        out: Annotated[Path, typer.Option("--out", help="Folder for everything (created; resumed if it holds a demo).")] = Path("runs/demo"),
        minutes: Annotated[float, typer.Option("--minutes", help="Training budget in minutes (> 0) on --clock; building the model and the trainer's few timing steps count.")] = 3.0,
        clock: Annotated[str, typer.Option("--clock", help="What --minutes counts: cpu (CPU time of the training process, default) or wall.")] = "cpu",
        objective: Annotated[str, typer.Option("--objective", help="hiergroup | densecl | vicregl | poodle (the CNN objectives).")] = "hiergroup",
        backbone: Annotated[str, typer.Option("--backbone", help="efficientnet_lite0 (pretrained: fine-tuned) | resnet18 | resnet50 (from scratch) | timm:<name> | a .safetensors checkpoint to start from.")] = "efficientnet_lite0",
        fast: Annotated[bool, typer.Option("--fast", help="Tiny sample and 3 training steps: for tests and quick tries.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Redo every step, even those already done in OUT.")] = False,
        preset: Annotated[str, typer.Option("--preset", help="Propagation preset for J&F: dino (7 recent frames, at the frames' native short side), crw (20 frames; about 3x slower) or live (2 frames, 360 short side).")] = "dino",
    ) -> None:
        import logging

        from densekit.apps.demo import DemoOptions, run_demo

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        run_demo(
            DemoOptions(out=out, minutes=minutes, clock=clock, objective=objective, backbone=backbone, fast=fast, force=force,
                        preset=preset),
            log=typer.echo,
        )
