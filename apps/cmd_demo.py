"""``densekit demo``: sample data -> training -> ONNX -> DAVIS J&F -> segment index -> report (densekit.apps.demo).

Typer only at import time; everything heavy is imported inside the command so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = (
    "The main job on the embedded default, end to end: make the sample dataset, train a backbone for a few "
    "minutes, export it to ONNX (parity-checked; TensorRT where a GPU is), score DAVIS J&F of the trained model "
    "beside the ImageNet-pretrained EfficientNet-Lite0 and the baselines (random init, pixels) on the sample's "
    "held-out split, build a segment index with the best model and search it, and write OUT/report.md with "
    "pictures. It ends by printing the command that opens the app on the results.\n\n"
    "Default objective: hiergroup (pixel contrast from a region hierarchy) on resnet18, the pair that learned "
    "most per unit of training time in the 2-minute run of benchmarks/train_quality.py.\n\n"
    "Resumable: run it again on the same OUT and the steps already done are skipped (an interrupted training "
    "run continues from its last checkpoint); --force redoes everything."
)


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app`` (called by densekit.apps.cli)."""

    @app.command("demo", help=HELP)
    def demo(
        out: Annotated[Path, typer.Option("--out", help="Folder for everything (created; resumed if it holds a demo).")] = Path("runs/demo"),
        minutes: Annotated[float, typer.Option("--minutes", help="Training budget in minutes of wall clock (> 0); building the model and the trainer's few timing steps count.")] = 3.0,
        objective: Annotated[str, typer.Option("--objective", help="poodle | densecl | vicregl | hiergroup.")] = "hiergroup",
        backbone: Annotated[str, typer.Option("--backbone", help="resnet18 | resnet50 | efficientnet_lite0 | timm:<name> | a .safetensors checkpoint to start from.")] = "resnet18",
        fast: Annotated[bool, typer.Option("--fast", help="Tiny sample and 3 training steps: for tests and quick tries.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Redo every step, even those already done in OUT.")] = False,
        preset: Annotated[str, typer.Option("--preset", help="Propagation preset for J&F: dino (7 recent frames, at the frames' native short side), crw (20 frames; about 3x slower) or live (2 frames, 360 short side).")] = "dino",
    ) -> None:
        import logging

        from densekit.apps.demo import DemoOptions, run_demo

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        run_demo(
            DemoOptions(out=out, minutes=minutes, objective=objective, backbone=backbone, fast=fast, force=force,
                        preset=preset),
            log=typer.echo,
        )
