"""``densekit benchmark MODEL``: a backbone through every runtime here, one table (densekit.apps.benchmark).

Typer only at import time; torch, ONNX Runtime and OpenVINO are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

HELP = (
    "Take a backbone through every runtime available on this machine (torch, ONNX Runtime, ONNX Runtime int8, "
    "OpenVINO, TensorRT where present) and print one table: parity to torch (cosine, worst location), latency at "
    "two sizes, throughput, and DAVIS J&F on --davis (default: a small embedded sample). A runtime that is missing "
    "or refuses the model is a row that says why. Writes OUT/benchmark.json and OUT/benchmark.png."
)


def register(app: typer.Typer) -> None:
    """Add the ``benchmark`` command to ``app`` (called by densekit.apps.cli)."""

    @app.command("benchmark", help=HELP)
    def benchmark(
        model: Annotated[str, typer.Argument(help="Backbone name (resnet18, efficientnet_lite0, timm:<name>), a .safetensors checkpoint or an .onnx file.")],
        out: Annotated[Path, typer.Option("--out", help="Folder for benchmark.json, benchmark.png and the exported models.")] = Path("runs/benchmark"),
        davis: Annotated[Optional[Path], typer.Option("--davis", help="DAVIS root for J&F (its val split when it has one); default: the embedded sample.")] = None,
        runtimes: Annotated[str, typer.Option("--runtimes", help="Comma-separated subset of torch,onnxruntime,onnxruntime-int8,openvino,tensorrt.")] = "torch,onnxruntime,onnxruntime-int8,openvino,tensorrt",
        sizes: Annotated[str, typer.Option("--sizes", help="Frame sizes HxW for latency (the first also for parity and throughput).")] = "360x640,480x864",
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed calls per latency figure (median).")] = 5,
        batch: Annotated[int, typer.Option("--batch", min=1, help="Frames per call for throughput.")] = 4,
        threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Intra-op threads of every runtime (default: the runtime's own).")] = None,
        preset: Annotated[str, typer.Option("--preset", help="Propagation preset for J&F: dino, crw or live.")] = "dino",
    ) -> None:
        from densekit.apps.benchmark import BenchmarkOptions, parse_runtimes, parse_sizes, run_benchmark

        opts = BenchmarkOptions(model=model, out=out, davis=davis, runtimes=parse_runtimes(runtimes),
                                sizes=parse_sizes(sizes), repeats=repeats, batch=batch, threads=threads, preset=preset)
        run_benchmark(opts, log=typer.echo)
