"""``densekit serve``: the HTTP feature service (:mod:`densekit.serve.http`) from the command line.

Typer only at import time; FastAPI, uvicorn and torch are imported inside the command, so
``densekit --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from densekit.serve.errors import DensekitError

MODEL_HELP = (
    "Backbone name (resnet18, resnet50, efficientnet_lite0, pixels, timm:<name>), a densekit "
    ".safetensors checkpoint, or an exported model the feature extractor can load."
)


def serve_command(
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)],
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind. Loopback by default; anything else warns.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="Largest request body in bytes (413 above it).")
    ] = 20 * 1024 * 1024,
    max_side: Annotated[
        int, typer.Option("--max-side", min=16, help="Largest image side fed to the network (and `resize` bound).")
    ] = 2048,
    device: Annotated[
        str, typer.Option("--device", help="auto (the backend's natural choice) | cpu | cuda[:N].")
    ] = "auto",
    backend: Annotated[
        str, typer.Option("--backend", help="auto | torch | onnxruntime | openvino | tensorrt (what runs the network).")
    ] = "auto",
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, max=256, help="Most frames in one forward pass (1: no batching).")
    ] = 8,
    max_delay_ms: Annotated[
        float, typer.Option("--max-delay-ms", min=0, max=1000, help="Longest a request waits for its batch to fill.")
    ] = 5.0,
    max_queue: Annotated[
        int | None, typer.Option("--max-queue", min=1, help="Requests waiting for the network (default 4 x --max-batch); "
                                 "503 with Retry-After beyond.")
    ] = None,
    deadline: Annotated[
        float, typer.Option("--deadline", min=0.001, help="Seconds from a request's head to its answer; 504 past it.")
    ] = 30.0,
    body_timeout: Annotated[
        float, typer.Option("--body-timeout", min=0.001, help="Seconds for the request head after connecting, and for "
                            "the body after the head; 408 and the connection closed past it.")
    ] = 10.0,
    per_client: Annotated[
        int, typer.Option("--per-client", min=1, help="Requests in progress per client address; 429 beyond.")
    ] = 100,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, help="Open connections in all; uvicorn answers 503 beyond.")
    ] = 1000,
) -> None:
    """Serve dense features over HTTP: POST /features (npy or PCA PNG), GET /health, GET /model, /docs.

    Requests that arrive together run as one batch (dynamic batching: --max-batch, --max-delay-ms).
    """
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.http import Limits, is_loopback, serve

    limits = Limits(max_bytes=max_bytes, max_side=max_side, read_timeout_s=body_timeout, per_client=per_client,
                    max_connections=max_connections, max_batch=max_batch, max_delay_ms=max_delay_ms,
                    max_queue=max_queue, deadline_s=deadline)
    limits.check()
    # Load before binding: a bad --model is one line and exit 2, not a half-started server.
    extractor = FeatureExtractor(model, device=None if device == "auto" else device, backend=backend)
    if not is_loopback(host):
        typer.echo(
            f"warning: binding to {host} exposes the feature service beyond this machine; it has no "
            "authentication or TLS. Use --host 127.0.0.1 (the default) unless that is intended.",
            err=True,
        )
    typer.echo(f"serving {extractor.meta.name}: POST /features, GET /health, GET /model, docs at /docs", err=True)
    serve(extractor, host=host, port=port, limits=limits, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``densekit serve`` to the CLI."""
    app.command("serve")(serve_command)
