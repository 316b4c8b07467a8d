"""``densekit app``: the Gradio web app (:mod:`densekit.apps.app`) from the command line.

Typer only at import time; Gradio, torch and the model are imported inside the command, so
``densekit --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densekit.serve.errors import DensekitError

MODEL_HELP = (
    "Backbone name (efficientnet_lite0: ImageNet-pretrained, the best offline model; resnet18, resnet50, "
    "timm:<name>), a densekit .safetensors checkpoint, an exported .onnx file or a TensorRT .engine."
)


def app_command(
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = "efficientnet_lite0",
    index: Annotated[
        Optional[Path], typer.Option("--index", help="Segment index folder (densekit index build) for the Search tab.")
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind. Loopback by default; anything else warns.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 7860,
    max_video_mb: Annotated[
        float, typer.Option("--max-video-mb", min=0.001, help="Largest uploaded video in megabytes.")
    ] = 200,
    max_frames: Annotated[int, typer.Option("--max-frames", min=2, help="Frames kept of a loaded video.")] = 600,
    preset: Annotated[
        Optional[str], typer.Option("--preset", help="Propagation preset: live (default), dino or crw.")
    ] = None,
    short_side: Annotated[
        Optional[int], typer.Option("--short-side", min=16, help="Default processing size (shorter side, pixels).")
    ] = None,
    samples_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--samples-dir", help="Where the bundled sample sequences are made (default ~/.cache/densekit/app-samples)."
        ),
    ] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", help="cpu | cuda[:N] (default: the backend's choice).")
    ] = None,
) -> None:
    """Open the web app: track objects through videos and the webcam, search segments, see features."""
    from densekit.apps.app import DEFAULT_SAMPLES_DIR, build_app, launch_kwargs
    from densekit.serve.http import is_loopback

    if index is not None and not index.is_dir():
        raise DensekitError(f"--index {index} is not a folder")
    demo = build_app(
        model,
        index,
        max_video_mb=max_video_mb,
        max_frames=max_frames,
        preset=preset,
        short_side=short_side,
        samples_dir=samples_dir or DEFAULT_SAMPLES_DIR,
        device=device,
    )
    if not is_loopback(host):
        typer.echo(
            f"warning: binding to {host} exposes the app beyond this machine; it has no authentication and "
            "its frames-folder and index boxes read paths on this server. Use --host 127.0.0.1 unless intended.",
            err=True,
        )
    typer.echo(f"densekit app on http://{host}:{port} (Ctrl+C to stop)", err=True)
    try:
        demo.launch(server_name=host, server_port=port, **launch_kwargs(max_video_mb))
    except OSError as exc:  # port taken
        raise DensekitError(f"cannot start the app on {host}:{port}: {exc}") from None


def register(app: typer.Typer) -> None:
    """Add ``densekit app`` to the CLI."""
    app.command("app")(app_command)
