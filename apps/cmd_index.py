"""``densekit index build|search``: a FAISS or Milvus index of image segments (densekit.retrieval.segment_index).

Typer only at import time; numpy, OpenCV, faiss, pymilvus and torch are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densekit.serve.errors import DensekitError

index_app = typer.Typer(
    help="Segment retrieval: index images as K-means segments of dense features, search by a region.",
    no_args_is_help=True,
)

MODEL_HELP = (
    "Backbone name (resnet18, resnet50, efficientnet_lite0, pixels, timm:<name>) or a densekit .safetensors "
    "checkpoint. Needed to create an index; an existing index uses its own model (a different one is an error)."
)


BACKEND_HELP = (
    "Vector store of a new index: faiss (files in the index folder) or milvus (milvus-lite in INDEX/milvus.db, "
    "or the server given by --uri). An existing index keeps its own."
)
URI_HELP = "Milvus server URI (http://host:19530) for --backend milvus; default: embedded milvus-lite."
TOKEN_HELP = "Milvus token (user:password or API key); never stored in the index."
WAIT_HELP = "Seconds to wait for another process writing the index to finish (then: one error line, exit 2)."
EF_HELP = "HNSW search breadth (faiss efSearch / Milvus ef); build stores it in the index, search overrides it."


def _parse_numbers(text: str | None, n: int, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n:
        raise DensekitError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return values


@index_app.command("build")
def build_command(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    index: Annotated[Path, typer.Option("--index", help="Index folder (created, or resumed if it exists).")],
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
    factory: Annotated[
        str,
        typer.Option(
            "--factory",
            help="faiss.index_factory string: Flat | HNSW32 | IVF{n},PQ{m} | IVF{n},Flat. With --backend milvus: "
            "FLAT, HNSW, IVF_FLAT, IVF_SQ8 (IVF{n},SQ8) or IVF_PQ (a Milvus server only).",
        ),
    ] = "Flat",
    segments: Annotated[int, typer.Option("--segments", min=1, help="K-means segments per image.")] = 15,
    spatial_weight: Annotated[
        float, typer.Option("--spatial-weight", min=0.0, help="Weight of the (y, x) term in K-means.")
    ] = 0.0,
    max_side: Annotated[int, typer.Option("--max-side", min=16, help="Resize images to this longer side.")] = 512,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="FAISS threads (default: all).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help=BACKEND_HELP)] = None,
    uri: Annotated[Optional[str], typer.Option("--uri", help=URI_HELP)] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="DENSEKIT_MILVUS_TOKEN", help=TOKEN_HELP)] = None,
    ef_search: Annotated[Optional[int], typer.Option("--ef-search", min=1, help=EF_HELP)] = None,
    wait: Annotated[float, typer.Option("--wait", min=0.0, help=WAIT_HELP)] = 10.0,
) -> None:
    """Index every image under IMAGES_DIR; images already in the index are skipped (resumable)."""
    from densekit.apps.progress import progress_bar
    from densekit.retrieval.segment_index import BACKENDS, DEFAULT_EF_SEARCH, SegmentIndex, list_images

    if backend is not None and backend not in BACKENDS:
        raise DensekitError(f"--backend must be {' or '.join(BACKENDS)}, got {backend!r}")
    if uri is not None and backend == "faiss":
        raise DensekitError("--uri applies to --backend milvus")
    files = list_images(images_dir)
    # under the index's writer lock: open it, or create it (clearing what an interrupted creation left)
    idx, created = SegmentIndex.open_or_create(
        index, model, lock_wait=wait, factory=factory, segments_per_image=segments, spatial_weight=spatial_weight,
        max_side=max_side, threads=threads, backend=backend or ("milvus" if uri is not None else "faiss"), uri=uri,
        token=token, ef_search=ef_search or DEFAULT_EF_SEARCH,
    )
    if not created:
        if backend is not None and backend != idx.backend:
            idx.close()
            raise DensekitError(f"{index} uses the {idx.backend} backend, not {backend}")
        if ef_search is not None:
            idx.set_search_params(ef_search=ef_search, persist=True)
        typer.echo(f"resuming {index}: {len(idx)} images already indexed")
    with idx, progress_bar(rate=False) as progress:
        task = progress.add_task("indexing", total=len(files))
        report = idx.add_images(files, progress=lambda _name, _added: progress.advance(task))
        total_images, total_segments = len(idx), idx.n_segments
    for name, reason in report.skipped:
        if reason != "already indexed":
            typer.echo(f"skipped {name}: {reason}", err=True)
    already = sum(1 for _, r in report.skipped if r == "already indexed")
    typer.echo(
        f"added {len(report.added)} images ({report.segments} segments); {already} already indexed; "
        f"{len(report.skipped) - already} skipped; index {index}: {total_images} images, {total_segments} segments"
    )


@index_app.command("search")
def search_command(
    index: Annotated[Path, typer.Option("--index", help="Index folder made by `densekit index build`.")],
    image: Annotated[Path, typer.Option("--image", help="Query image.")],
    point: Annotated[Optional[str], typer.Option("--point", help="x,y: the query image's segment under it.")] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Query mask PNG (non-zero = region).")] = None,
    box: Annotated[Optional[str], typer.Option("--box", help="x0,y0,x1,y1: the cells inside this box.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of hits.")] = 10,
    grid: Annotated[
        Optional[Path], typer.Option("--grid", help="Write a PNG grid of the query and its hits with outlines.")
    ] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Override the stored model (must match).")] = None,
    ef_search: Annotated[Optional[int], typer.Option("--ef-search", min=1, help=EF_HELP)] = None,
    gpu: Annotated[
        bool, typer.Option("--gpu", help="Search on the GPUs faiss sees (faiss backend, Flat/IVF; error if none).")
    ] = False,
    token: Annotated[Optional[str], typer.Option("--token", envvar="DENSEKIT_MILVUS_TOKEN", help=TOKEN_HELP)] = None,
) -> None:
    """Find the segments most similar to a region of the query image (whole image if no region)."""
    from densekit.retrieval.segment_index import SegmentIndex
    from densekit.serve.imageio import read_image, read_mask
    from densekit.serve.viz import write_grid

    pt = _parse_numbers(point, 2, "--point")
    bx = _parse_numbers(box, 4, "--box")
    query = read_image(image)
    qmask = read_mask(mask) > 0 if mask is not None else None
    with SegmentIndex.open(index, model, ef_search=ef_search, gpu=gpu, token=token) as idx:
        found = idx.query_region(query, mask=qmask, point=pt, box=bx, k=k)
    hits = found.hits
    typer.echo(f"{'rank':>4}  {'score':>7}  {'image':>6}  {'segment':>7}  box              path")
    for rank, h in enumerate(hits, 1):
        box_s = ",".join(str(v) for v in h.box)
        typer.echo(f"{rank:>4}  {h.score:7.4f}  {h.image_id:>6}  {h.segment_id:>7}  {box_s:<15}  {h.path or '-'}")
    if grid is not None:
        write_grid(grid, query, found.mask, hits)
        typer.echo(f"wrote {grid}")


def register(app: typer.Typer) -> None:
    """Attach ``densekit index`` to the main app (called by densekit.apps.cli)."""
    app.add_typer(index_app, name="index")
