"""The ``densekit`` command line.

Every subcommand imports its heavy dependencies (torch, timm, OpenCV) inside the command body, so
``densekit --help`` and each ``--help`` answer fast with the base install. Bad input raises
:class:`~densekit.serve.errors.DensekitError`; :func:`main` prints it as one line and exits with 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from densekit.serve.errors import DensekitError

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
PRESET_HELP = "Propagation preset: dino (n=7, k=5, T=0.1) or crw (n=20, k=10, T=0.05)."


def _propagation_config(
    preset: str,
    n_context: Optional[int],
    topk: Optional[int],
    radius: Optional[float],
    temperature: Optional[float],
    short_side: Optional[int] = None,
):
    from densekit.retrieval.propagation import PRESETS, preset as make_preset

    if preset not in PRESETS:
        raise DensekitError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    overrides = {
        k: v
        for k, v in {
            "n_last": n_context,
            "topk": topk,
            "radius": radius,
            "temperature": temperature,
            "short_side": short_side,
        }.items()
        if v is not None
    }
    if short_side is not None and overrides.get("resize", PRESETS[preset].resize) != "dino":
        # resize="native" ignores short_side; saying nothing would let a user believe it took effect
        overrides["resize"] = "dino"
    return make_preset(preset, **overrides)


def _progress(rate: bool = True):
    """A rich progress bar: description, bar, done/total, (with ``rate``: the task's ``rate`` field), ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn("{task.fields[rate]}")] if rate else []),
        TimeRemainingColumn(),
        transient=False,
    )


def _propagate_to_dir(propagator, video, first_mask, out_dir: Path, progress, description: str, overlay=None):
    """Run the streaming propagator over ``video`` and write one palette PNG per frame as it goes.

    Masks are written frame by frame (atomically), so an interrupted run keeps what it finished.
    Returns the number of frames written.
    """
    import time

    from densekit.serve.imageio import write_mask

    out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(description, total=len(video), rate="")
    t0 = time.perf_counter()
    masks_for_overlay = [] if overlay is not None else None
    n = 0
    for name, mask in zip(video.names, propagator.stream(iter(video), first_mask)):
        write_mask(out_dir / f"{name}.png", mask)
        if masks_for_overlay is not None:
            masks_for_overlay.append(mask)
        n += 1
        elapsed = time.perf_counter() - t0
        progress.update(task, advance=1, rate=f"{n / elapsed:.1f} fps" if elapsed > 0 else "")
    if overlay is not None:
        from densekit.serve.imageio import write_overlay_video

        write_overlay_video(overlay, iter(video), masks_for_overlay, video.fps)
    return n


@data_app.command("sample")
def data_sample(
    out: Annotated[Path, typer.Argument(help="Folder to create (DAVIS-2017 layout).")],
    sequences: Annotated[int, typer.Option(min=1, help="Number of video sequences.")] = 6,
    frames: Annotated[int, typer.Option(min=4, help="Frames per sequence.")] = 24,
    height: Annotated[int, typer.Option(min=32, help="Frame height in pixels.")] = 240,
    width: Annotated[int, typer.Option(min=32, help="Frame width in pixels.")] = 432,
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
    n_context: Annotated[Optional[int], typer.Option("--n-context", min=0, help="Override: past frames.")] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", min=1, help="Override: neighbours.")] = None,
    radius: Annotated[Optional[float], typer.Option("--radius", min=0, help="Override: radius (cells).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=1e-6)] = None,
    short_side: Annotated[
        Optional[int], typer.Option("--short-side", min=16, help="Override: resize frames so the shorter side is this.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
) -> None:
    """Track the objects of a first-frame mask through a video; write one mask per frame."""
    from densekit.retrieval.propagation import MaskPropagator
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import open_video, read_mask

    cfg = _propagation_config(preset, n_context, topk, radius, temperature, short_side)
    source = open_video(video)
    first = read_mask(mask)
    extractor = FeatureExtractor(backbone, device=device)
    propagator = MaskPropagator(extractor, cfg)
    with _progress() as progress:
        n = _propagate_to_dir(propagator, source, first, out, progress, f"track {video.name}", overlay)
    typer.echo(f"wrote {n} masks to {out}" + (f" and overlay {overlay}" if overlay else ""))


@eval_app.command("davis")
def eval_davis(
    root: Annotated[Path, typer.Argument(help="DAVIS root (2016 or 2017 layout), e.g. from `densekit data sample`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for masks, CSVs and the bar chart.")],
    backbone: Annotated[str, typer.Option("--backbone", help=BACKBONE_HELP)] = "efficientnet_lite0",
    split: Annotated[Optional[str], typer.Option("--split", help="Split list name (val, train...).")] = "val",
    sequences: Annotated[Optional[str], typer.Option("--sequences", help="Comma-separated subset.")] = None,
    preset: Annotated[str, typer.Option("--preset", help=PRESET_HELP)] = "dino",
    n_context: Annotated[Optional[int], typer.Option("--n-context", min=0)] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", min=1)] = None,
    radius: Annotated[Optional[float], typer.Option("--radius", min=0)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=1e-6)] = None,
    short_side: Annotated[
        Optional[int], typer.Option("--short-side", min=16, help="Override: resize frames so the shorter side is this.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
) -> None:
    """Propagate every sequence's first mask, then score J&F exactly as davis2017-evaluation does."""
    from densekit.retrieval.davis_eval import evaluate_davis, format_table, plot_per_sequence, write_csvs
    from densekit.retrieval.propagation import MaskPropagator
    from densekit.serve.davis import DavisRoot
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import open_video

    cfg = _propagation_config(preset, n_context, topk, radius, temperature, short_side)
    davis = DavisRoot(root)
    names = davis.sequences(split)
    if sequences:
        wanted = [s.strip() for s in sequences.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise DensekitError(f"sequence(s) not in split {split!r}: {', '.join(unknown)}")
        names = wanted
    if not names:
        raise DensekitError(f"no sequences in {root} for split {split!r}")
    extractor = FeatureExtractor(backbone, device=device)
    propagator = MaskPropagator(extractor, cfg)
    with _progress() as progress:
        for seq in names:
            frames_dir = davis.frame_paths(seq)[0].parent
            _propagate_to_dir(
                propagator, open_video(frames_dir), davis.first_mask(seq), out / seq, progress, seq
            )
    result = evaluate_davis(root, out, split=split, sequences=names)
    split_name = split or "all"
    write_csvs(result, out, split_name)
    plot_per_sequence(result, out / f"per-sequence_results-{split_name}.png")
    typer.echo(f"{backbone} ({preset} preset) on {root}, split {split_name}")
    typer.echo(format_table(result))
    typer.echo(f"masks, CSVs and chart in {out}")


@app.command("info")
def info(
    model: Annotated[str, typer.Argument(help=BACKBONE_HELP)],
) -> None:
    """Print a backbone's metadata contract (name, stride, dim, normalisation, version)."""
    from densekit.serve.backbones import load_backbone

    backbone = load_backbone(model)
    typer.echo(backbone.meta.to_json())


def _register_area_commands() -> None:
    # Each area's commands live in their own small module (apps/cmd_<area>.py, typer only, heavy
    # imports inside the command bodies), so --help stays fast.
    import importlib

    for name in ("cmd_train", "cmd_export", "cmd_serve", "cmd_index", "cmd_eval_retrieval", "cmd_app", "cmd_demo"):
        try:
            module = importlib.import_module(f"densekit.apps.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"densekit.apps.{name}":
                raise
            continue
        module.register(app)


_register_area_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``densekit`` console script: bad input -> one line on stderr, exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except DensekitError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
