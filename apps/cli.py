"""The ``densekit`` command line.

Every subcommand imports its heavy dependencies (torch, timm, OpenCV) inside the command body, so
``densekit --help`` and each ``--help`` answer fast with the base install. Bad input raises
:class:`~densekit.serve.errors.DensekitError`; :func:`main` prints it, and every other way a user can go
wrong (a usage error from typer/click, a path that cannot be read or written, a missing optional
extra), as one ``error:`` line and exits with 2. Nothing reaches the user as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from densekit.apps.progress import progress_bar
from densekit.serve.errors import DensekitError, one_line

app = typer.Typer(
    name="densekit",
    help="Dense self-supervised vision backbones: train, export, serve, track masks through video, evaluate on DAVIS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: make the embedded sample dataset.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluations: DAVIS video object segmentation (J&F), segment retrieval and dense NN segmentation (mIoU).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

BACKBONE_HELP = (
    "resnet18 | resnet50 (random init, seeded) | efficientnet_lite0 (ImageNet-pretrained) | pixels | "
    "timm:<model name> (random init) | path to a densekit .safetensors checkpoint"
)
# Written out, not built from retrieval.propagation.PRESETS (that module imports torch, and --help must
# not); tests/test_cli_bad_input.py checks it against PRESETS.
PRESET_HELP = (
    "Propagation preset: dino (n=7, k=5, T=0.1, 480 short side), crw (n=20, k=10, T=0.05, native size) or "
    "live (n=2, k=5, T=0.1, 360 short side, 64 PCA directions; the app's live tracking)."
)

# The propagation overrides that `track` and `eval davis` share (None: the preset's value).
NContextOpt = Annotated[Optional[int], typer.Option("--n-context", min=0, help="Override: past frames.")]
TopkOpt = Annotated[Optional[int], typer.Option("--topk", min=1, help="Override: neighbours.")]
RadiusOpt = Annotated[Optional[float], typer.Option("--radius", min=0, help="Override: radius (cells).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", min=1e-6, help="Override: softmax temperature.")]
ShortSideOpt = Annotated[
    Optional[int], typer.Option("--short-side", min=16, help="Override: resize frames so the shorter side is this.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]


@data_app.command("sample")
def data_sample(
    out: Annotated[Path, typer.Argument(help="Folder to create (DAVIS-2017 layout).")],
    sequences: Annotated[int, typer.Option(min=1, help="Number of video sequences.")] = 6,
    frames: Annotated[int, typer.Option(min=4, help="Frames per sequence.")] = 24,
    height: Annotated[int, typer.Option(min=64, help="Frame height in pixels.")] = 240,
    width: Annotated[int, typer.Option(min=64, help="Frame width in pixels.")] = 432,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same dataset.")] = 0,
) -> None:
    """Make the embedded sample dataset: moving textured objects over real photographs, exact masks."""
    from densekit.serve.sample import make_sample

    root = make_sample(out, sequences=sequences, frames=frames, height=height, width=width, seed=seed)
    typer.echo(f"wrote sample dataset to {root}")


@app.command("track")
def track(
    video: Annotated[Path, typer.Argument(help="A video file (mp4, avi, webm...) or a folder of frames.")],
    mask: Annotated[Path, typer.Option("--mask", help="First-frame mask: palette PNG of object ids (or 0/255).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for one palette PNG per frame.")],
    backbone: Annotated[str, typer.Option("--backbone", help=BACKBONE_HELP)] = "efficientnet_lite0",
    preset: Annotated[str, typer.Option("--preset", help=PRESET_HELP)] = "dino",
    overlay: Annotated[Optional[Path], typer.Option("--overlay", help="Also write an overlay mp4 here.")] = None,
    n_context: NContextOpt = None,
    topk: TopkOpt = None,
    radius: RadiusOpt = None,
    temperature: TemperatureOpt = None,
    short_side: ShortSideOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Track the objects of a first-frame mask through a video; write one mask per frame."""
    from densekit.retrieval.davis_protocol import progress_callback, propagate_to_dir
    from densekit.retrieval.propagation import MaskPropagator, config_from_options
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import open_video, read_mask, write_overlay_video

    cfg = config_from_options(preset, n_context=n_context, topk=topk, radius=radius, temperature=temperature,
                              short_side=short_side)
    source = open_video(video)
    first = read_mask(mask)
    propagator = MaskPropagator(FeatureExtractor(backbone, device=device), cfg)
    masks: list = []
    label = f"track {video.name}"
    with progress_bar() as progress:
        bar = progress_callback(progress)
        bar(label, 0, len(source))

        def on_mask(done: int, m) -> None:  # noqa: ANN001 - a mask
            if overlay is not None:
                masks.append(m)
            bar(label, done, len(source))

        n = propagate_to_dir(propagator, iter(source), first, out, source.names, on_mask)
        if overlay is not None:
            write_overlay_video(overlay, iter(source), masks, source.fps)
    typer.echo(f"wrote {n} masks to {out}" + (f" and overlay {overlay}" if overlay else ""))


@eval_app.command("davis")
def eval_davis(
    root: Annotated[Path, typer.Argument(help="DAVIS root (2016 or 2017 layout), e.g. from `densekit data sample`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for masks, CSVs and the bar chart.")],
    backbone: Annotated[str, typer.Option("--backbone", help=BACKBONE_HELP)] = "efficientnet_lite0",
    split: Annotated[Optional[str], typer.Option("--split", help="Split list name (val, train...).")] = "val",
    sequences: Annotated[Optional[str], typer.Option("--sequences", help="Comma-separated subset.")] = None,
    preset: Annotated[str, typer.Option("--preset", help=PRESET_HELP)] = "dino",
    n_context: NContextOpt = None,
    topk: TopkOpt = None,
    radius: RadiusOpt = None,
    temperature: TemperatureOpt = None,
    short_side: ShortSideOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Propagate every sequence's first mask, then score J&F exactly as davis2017-evaluation does."""
    from densekit.retrieval.davis_eval import format_table, plot_per_sequence
    from densekit.retrieval.davis_protocol import progress_callback, score_davis, select_sequences
    from densekit.retrieval.propagation import config_from_options
    from densekit.serve.extractor import FeatureExtractor

    cfg = config_from_options(preset, n_context=n_context, topk=topk, radius=radius, temperature=temperature,
                              short_side=short_side)
    wanted = [s.strip() for s in sequences.split(",") if s.strip()] if sequences else None
    names = select_sequences(root, split, wanted)  # a mistyped name fails before the model loads
    extractor = FeatureExtractor(backbone, device=device)
    with progress_bar() as progress:
        score = score_davis(extractor, root, cfg, out, sequences=names, on_frame=progress_callback(progress),
                            split=split)
    result = score.result
    split_name = split or "all"
    plot_per_sequence(result, out / f"per-sequence_results-{split_name}.png")
    typer.echo(f"{backbone} ({preset} preset) on {root}, split {split_name}")
    typer.echo(format_table(result))
    typer.echo(f"masks, CSVs and chart in {out}")


@app.command("info")
def info(
    model: Annotated[str, typer.Argument(help=BACKBONE_HELP)],
) -> None:
    """Print a backbone's metadata contract (name, stride, dim, normalisation, version)."""
    from densekit.serve.loader import load_backbone

    backbone = load_backbone(model)
    typer.echo(backbone.meta.to_json())


def _register_area_commands() -> None:
    """Each area's commands live in their own small module (apps/cmd_<area>.py) with a ``register(group)``.

    They import only typer when loaded (heavy and optional imports live in the command bodies), so a
    failure here is a broken install, not a missing extra: it is said in one line, never skipped.
    """
    try:
        from densekit.apps import (cmd_app, cmd_benchmark, cmd_demo, cmd_eval_retrieval, cmd_export, cmd_index, cmd_serve,
                                   cmd_train)
    except ImportError as exc:
        raise SystemExit(
            f"error: densekit is installed incompletely ({one_line(exc)}); reinstall it "
            "(pip install --force-reinstall densekit)"
        ) from None
    for module in (cmd_train, cmd_export, cmd_serve, cmd_index, cmd_app, cmd_demo, cmd_benchmark):
        module.register(app)
    cmd_eval_retrieval.register(eval_app)


_register_area_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``densekit`` console script: bad input -> one ``error:`` line on stderr, exit code 2.

    An unexpected exception (a bug) is one line too, exit code 1; ``DENSEKIT_DEBUG=1`` re-raises it.
    """
    try:
        app(args=argv, prog_name="densekit", standalone_mode=False)
    except DensekitError as exc:
        return _error(one_line(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except Exception as exc:
        return _unexpected(exc)
    return 0


def _error(message: str, code: int = 2) -> int:
    typer.echo(f"error: {message}", err=True)
    return code


def _unexpected(exc: Exception) -> int:
    """Usage errors, unreadable/unwritable paths and missing extras as one line; anything else is a bug."""
    import os

    if _is_click_exception(exc):
        return _usage_error(exc)
    if isinstance(exc, ModuleNotFoundError):
        return _missing_module(exc)
    if isinstance(exc, OSError):  # a path that cannot be read or written, a full disk, a port in use
        where = f": {exc.filename}" if exc.filename else ""
        return _error(f"{exc.strerror}{where}" if exc.strerror else one_line(exc))
    if os.environ.get("DENSEKIT_DEBUG"):
        raise exc
    return _error(f"unexpected {type(exc).__name__}: {one_line(exc)} (a bug; DENSEKIT_DEBUG=1 shows where)", 1)


def _is_click_exception(exc: Exception) -> bool:
    # Typer 0.29 (installed here) vendors its own click as typer._click, older typer used click itself, so
    # `except click.ClickException` misses them: recognise either by what click exceptions have (a message
    # for the user and an exit code), not by the module they come from.
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _usage_error(exc: Exception) -> int:
    ctx = getattr(exc, "ctx", None)
    if "NoArgsIsHelpError" in {c.__name__ for c in type(exc).__mro__}:  # `densekit eval` alone: its help
        exc.show()  # type: ignore[attr-defined]
        return exc.exit_code  # type: ignore[attr-defined]
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return _error(" ".join(exc.format_message().split()) + hint)  # type: ignore[attr-defined]


def _missing_module(exc: ModuleNotFoundError) -> int:
    """An optional extra that is not installed: name the extra; a core dependency: a broken install."""
    name = (exc.name or "").split(".")[0]
    extra = _extra_providing(name)
    if extra:
        return _error(f"this needs {name}, which is not installed: pip install 'densekit[{extra}]'")
    return _error(f"{one_line(exc)} (a broken install? pip install --force-reinstall densekit)", 1)


def _extra_providing(module: str) -> str | None:
    """The densekit extra whose requirement installs ``module`` (from the installed metadata: pyproject)."""
    import re
    from importlib import metadata

    try:
        requirements = metadata.requires("densekit") or []
    except metadata.PackageNotFoundError:
        return None
    for req in requirements:
        found = re.match(r"\s*([A-Za-z0-9_.-]+).*;.*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if found and found[1].lower().replace("-", "_") == module.lower() and found[2] != "dev":
            return found[2]
    return None


if __name__ == "__main__":
    sys.exit(main())
