"""``densekit export onnx|openvino|trt|triton``: exported models with verified parity.

Typer only at import time; torch, onnx, onnxruntime, openvino and tensorrt are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

export_app = typer.Typer(
    help="Export a backbone: ONNX (verified against PyTorch), OpenVINO IR, TensorRT engine, Triton model "
    "repository.",
    no_args_is_help=True,
)

MODEL_HELP = (
    "Backbone name (resnet18, resnet50, efficientnet_lite0, pixels, timm:<name>) or a densekit .safetensors checkpoint."
)


@export_app.command("onnx")
def export_onnx_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Destination .onnx file (written atomically).")],
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18 for timm ViTs).")] = 18,
    static: Annotated[
        Optional[str], typer.Option("--static", help="H,W: fix height and width (batch stays dynamic).")
    ] = None,
    half: Annotated[
        bool, typer.Option("--half", help="float16 graph (float32 I/O; LayerNorm/Softmax in float32).")
    ] = False,
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify the graph with onnxslim.")] = False,
    exporter: Annotated[
        str, typer.Option("--exporter", help="auto (TorchScript for CNNs, dynamo for ViTs) | torchscript | dynamo.")
    ] = "auto",
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the ONNX Runtime vs PyTorch parity check.")
    ] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="int8 graph for ONNX Runtime's CPU provider, calibrated on --calib images.")
    ] = False,
    calib: Annotated[
        Optional[Path], typer.Option("--calib", help="Folder of calibration images for --int8 (a few dozen suffice).")
    ] = None,
    packed: Annotated[
        bool,
        typer.Option("--packed", help="timm ViTs: a packed graph (several images of their own size per sequence; "
                     "inputs patches, coords, seg, is_prefix, grid; see densekit.export.packed)."),
    ] = False,
    max_side: Annotated[
        int, typer.Option("--max-side", min=1, help="--packed: the largest image side, in patches, the graph takes.")
    ] = 64,
) -> None:
    """Export to ONNX with the model contract in metadata_props; check it against PyTorch on real photos."""
    from densekit.export.onnx import export_onnx, parse_hw
    from densekit.serve.errors import DensekitError

    if packed:
        others = {"--static": static is not None, "--half": half, "--simplify": simplify,
                  "--int8/--calib": int8 or calib is not None, "--exporter": exporter != "auto"}
        _export_packed(model, out, opset, max_side, not no_verify, others)
        return
    if int8 and calib is None:
        raise DensekitError("--int8 needs --calib DIR (a folder of representative images)")
    if calib is not None and not int8:
        raise DensekitError("--calib is only used with --int8")
    report = export_onnx(
        model,
        out,
        opset=opset,
        static=parse_hw(static),
        half=half,
        simplify=simplify,
        exporter=exporter,
        verify=not no_verify,
        int8_calib=calib if int8 else None,
        log=typer.echo,
    )
    extras = [f"opset {report.opset}", f"{report.exporter} exporter"]
    if report.simplified_by:
        extras.append(f"simplified by {report.simplified_by}")
    if report.half:
        extras.append("fp16")
    if report.int8:
        extras.append("int8 for the CPU")
    shape = "static " + "x".join(map(str, report.static)) if report.static else "dynamic batch/height/width"
    typer.echo(f"wrote {out} ({', '.join(extras)}, {shape}) in {report.seconds:.1f}s")


def _export_packed(model: str, out: Path, opset: int, max_side: int, verify: bool, others: dict[str, bool]) -> None:
    from densekit.export.packed import export_packed_onnx
    from densekit.serve.errors import DensekitError

    given = [name for name, on in others.items() if on]
    if given:
        raise DensekitError(f"--packed does not combine with {', '.join(given)}")
    report = export_packed_onnx(model, out, opset=opset, max_side=max_side, verify=verify, log=typer.echo)
    typer.echo(f"wrote {out} (packed, opset {report.opset}, image sides up to {report.max_side} patches, "
               f"TensorRT op check passed) in {report.seconds:.1f}s")


@export_app.command("trt")
def export_trt_command(
    model: Annotated[str, typer.Argument(help="An .onnx file from `densekit export onnx`, or " + MODEL_HELP)],
    out: Annotated[
        Path, typer.Option("--out", help="Destination engine (.engine/.plan); metadata goes to <out>.json.")
    ],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine (LayerNorm/Softmax kept FP32).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 engine, calibrated on --calib images.")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Folder of calibration images for --int8.")] = None,
    min_shape: Annotated[Optional[str], typer.Option("--min-shape", help="Profile min, e.g. 1x3x64x64.")] = None,
    opt_shape: Annotated[Optional[str], typer.Option("--opt-shape", help="Profile opt, e.g. 1x3x480x848.")] = None,
    max_shape: Annotated[Optional[str], typer.Option("--max-shape", help="Profile max, e.g. 4x3x1088x1920.")] = None,
    workspace: Annotated[Optional[float], typer.Option("--workspace", help="Workspace memory limit in GiB.")] = None,
    timing_cache: Annotated[
        Optional[Path], typer.Option("--timing-cache", help="Timing cache file (read if present, then updated).")
    ] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the TensorRT vs ONNX Runtime check.")] = False,
) -> None:
    """Build a TensorRT engine (plain plan file + JSON sidecar); needs TensorRT >= 10 and an NVIDIA GPU."""
    from densekit.export.trt import build_engine

    report = build_engine(
        model,
        out,
        fp16=fp16,
        int8=int8,
        calib=calib,
        min_shape=min_shape,
        opt_shape=opt_shape,
        max_shape=max_shape,
        workspace_gb=workspace,
        timing_cache=timing_cache,
        verify=not no_verify,
        log=typer.echo,
    )
    typer.echo(
        f"wrote {report.path} ({report.plan.precision}, TensorRT {report.info.tensorrt_version}) and "
        f"{report.path.name}.json in {report.seconds:.1f}s"
    )


@export_app.command("openvino")
def export_openvino_command(
    model: Annotated[str, typer.Argument(help="An .onnx file from `densekit export onnx`, or " + MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Destination folder for model.xml + model.bin (replaced whole).")],
    precision: Annotated[
        str, typer.Option("--precision", help="auto (bf16 where the CPU has it, else f32) | f32 | bf16 | f16; "
                          "recorded in the IR and used when it is served.")
    ] = "auto",
    threads: Annotated[
        Optional[int], typer.Option("--threads", min=1, help="OpenVINO threads for the parity check.")
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the OpenVINO vs PyTorch/ONNX Runtime parity check.")
    ] = False,
) -> None:
    """Write an OpenVINO IR folder with the model contract in its rt_info; check it on real photos."""
    from densekit.export.openvino import export_openvino

    report = export_openvino(model, out, precision=precision, verify=not no_verify, threads=threads, log=typer.echo)
    shape = "static " + "x".join(map(str, report.static)) if report.static else "dynamic batch/height/width"
    checked = f"checked against {report.reference}" if report.parity else "not verified"
    typer.echo(f"wrote {out}/model.xml (openvino:CPU:{report.precision}, {shape}, {checked}) in {report.seconds:.1f}s")


@export_app.command("triton")
def export_triton_command(
    model: Annotated[Path, typer.Argument(help="An exported .onnx file or TensorRT .engine/.plan.")],
    repo: Annotated[Path, typer.Option("--repo", help="Triton model repository folder.")],
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, help="max_batch_size (default 8).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Model name (default: the file's stem).")] = None,
) -> None:
    """Write a Triton model repository entry (config.pbtxt with dynamic batching + the model file)."""
    from densekit.export.triton import write_triton_repo

    entry = write_triton_repo(model, repo, max_batch=max_batch, name=name)
    cfg = entry.config
    typer.echo(
        f"wrote {entry.config_path} ({cfg['platform']}, max_batch_size {cfg['max_batch_size']}, input dims "
        f"{cfg['input'][0]['dims']}, output dims {cfg['output'][0]['dims']}; parsed back with {entry.parsed_with}) "
        f"and {entry.model_file}"
    )


def register(app: typer.Typer) -> None:
    """Add ``densekit export`` to the CLI."""
    app.add_typer(export_app, name="export")
