"""``densekit eval retrieval``: segment-retrieval and Hummingbird mIoU (densekit.retrieval.retrieval_eval).

Typer only at import time; numpy, OpenCV, faiss, torch and matplotlib are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

BACKBONE_HELP = (
    "resnet18 | resnet50 (random init, seeded) | efficientnet_lite0 (ImageNet-pretrained) | pixels | "
    "timm:<model name> (random init) | a densekit .safetensors checkpoint | an exported .onnx file"
)


def eval_retrieval(
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled set: a `densekit data sample` folder (SemanticAnnotations + classes.txt) or a PASCAL VOC "
            "layout folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)."
        ),
    ],
    backbone: Annotated[str, typer.Option("--backbone", help=BACKBONE_HELP)] = "efficientnet_lite0",
    mode: Annotated[str, typer.Option("--mode", help="segments | hummingbird | both.")] = "both",
    k: Annotated[int, typer.Option("--k", min=1, help="Hummingbird: nearest neighbours per patch.")] = 30,
    temperature: Annotated[
        float, typer.Option("--temperature", min=1e-6, help="Hummingbird: softmax temperature.")
    ] = 0.02,
    segments: Annotated[int, typer.Option("--segments", min=1, help="Segment retrieval: K-means K per image.")] = 15,
    split_train: Annotated[str, typer.Option("--split-train", help="Split used as the labelled memory.")] = "train",
    split_val: Annotated[str, typer.Option("--split-val", help="Split that is queried and scored.")] = "val",
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Folder for metrics.json, per_class.csv and per_class_iou.png.")
    ] = None,
    memory_size: Annotated[
        int, typer.Option("--memory-size", min=1, help="Hummingbird: memory bank cap (entries; seeded sampling).")
    ] = 1_024_000,
    void_in_memory: Annotated[
        str,
        typer.Option("--void-in-memory", help="Hummingbird: 'ignore' void pixels in patch labels or count them as 'background'."),
    ] = "ignore",
    max_side: Annotated[int, typer.Option("--max-side", min=16, help="Resize images to at most this longer side.")] = 512,
    frame_step: Annotated[
        int, typer.Option("--frame-step", min=1, help="Use every n-th annotated frame/image (1 = all).")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="K-means and memory-sampling seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto (.onnx models).")] = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="FAISS threads (default: all).")] = None,
) -> None:
    """Score dense features by retrieval: segment-retrieval mIoU and Hummingbird dense-NN mIoU.

    (a) segments: each image cut by K-means on its features; each val segment takes the class of its
    nearest train segment. (b) hummingbird: each val patch takes the softmax-weighted class histograms of
    its k nearest train patches; bilinear upsampling, argmax. mIoU over the classes present in val.
    """
    import time

    from rich.console import Console

    from densekit.apps.progress import progress_bar
    from densekit.retrieval.retrieval_eval import (
        RetrievalEvalConfig,
        evaluate_retrieval,
        open_labelled_set,
        parse_modes,
        rich_table,
        write_report,
    )
    from densekit.retrieval.segment_index import set_threads
    from densekit.serve.errors import DensekitError

    modes = parse_modes(mode)
    cfg = RetrievalEvalConfig(
        segments=segments, k=k, temperature=temperature, memory_size=memory_size, void_in_memory=void_in_memory,
        max_side=max_side, frame_step=frame_step, seed=seed,
    )
    cfg.check()
    if out is not None and out.exists() and not out.is_dir():
        raise DensekitError(f"--out {out} exists and is not a folder")
    data_set = open_labelled_set(data, split_train, split_val, frame_step)  # bad data fails before the model loads
    set_threads(threads)
    from densekit.serve.extractor import FeatureExtractor

    t0 = time.perf_counter()
    extractor = FeatureExtractor(backbone, device=None if device == "auto" else device, seed=seed)
    console = Console()
    if data_set.note:
        console.print(f"note: {data_set.note}")
    with progress_bar(rate=False, console=console) as progress:
        tasks = {
            "train": progress.add_task(f"train features ({split_train})", total=len(data_set.train)),
            "val": progress.add_task(f"val features ({split_val})", total=len(data_set.val)),
        }
        report = evaluate_retrieval(
            data_set, extractor, modes, cfg, split_train=split_train, split_val=split_val,
            progress=lambda stage, done, _total: progress.update(tasks[stage], completed=done),
            backbone_name=backbone,
        )
    report.seconds["wall"] = time.perf_counter() - t0
    for table in rich_table(report):
        console.print(table)
    if out is not None:
        paths = write_report(report, out)
        typer.echo(f"wrote {', '.join(p.name for p in paths)} to {out}")


def register(eval_group: typer.Typer) -> None:
    """Add ``retrieval`` to ``eval_group``, the ``densekit eval`` sub-command group that the CLI passes in."""
    eval_group.command("retrieval")(eval_retrieval)
