"""The Search tab's work: build or update a segment index from a folder, search by a click on a query image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from densekit.apps.app.display import DISPLAY_MAX_SIDE, downscale
from densekit.apps.app.engine import Engine
from densekit.serve.errors import DensekitError
from densekit.serve.viz import QUERY_COLOUR, outline


def search_point(
    engine: Engine, index_dir: Any, image: Any, x: Any, y: Any, k: int = 8
) -> tuple[list[tuple[np.ndarray, str]], np.ndarray, str]:
    """Segments nearest to the query image's segment under (x, y): (gallery items, query picture, status)."""
    from densekit.serve.imageio import read_image

    engine.index_root(index_dir)  # no index: say so before anything else
    if image is None:
        raise DensekitError("Choose a query image first.")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DensekitError("the query must be an RGB image")
    arr = np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)
    H, W = arr.shape[:2]
    try:
        pt = (float(x), float(y))
    except (TypeError, ValueError):
        raise DensekitError("Click a region of the query image.") from None
    if not (0 <= pt[0] < W and 0 <= pt[1] < H):
        raise DensekitError(f"point ({pt[0]:g}, {pt[1]:g}) is outside the {W}x{H} image")
    k = max(1, int(k))
    idx = engine.open_index(index_dir)
    try:
        found = idx.query_region(arr, point=pt, k=k)
        hits, region = found.hits, found.mask
        n_images = len(idx)
    finally:
        idx.close()
    items: list[tuple[np.ndarray, str]] = []
    for rank, h in enumerate(hits, 1):
        name = Path(h.path).name if h.path else f"image {h.image_id}"
        try:
            img = read_image(h.path) if h.path else None
        except DensekitError:
            img = None  # moved or deleted since it was indexed
        if img is None or img.shape[:2] != h.mask.shape:
            img = np.full((*h.mask.shape, 3), 40, np.uint8)
        items.append((downscale(outline(img, h.mask), 320), f"#{rank} score {h.score:.3f} · {name}"))
    query = downscale(outline(arr, region, QUERY_COLOUR), DISPLAY_MAX_SIDE)
    status = f"{len(hits)} nearest segments among {n_images} indexed images (query region outlined in yellow)."
    return items, query, status


def build_index(engine: Engine, images_dir: Any, index_dir: Any = None, progress: Any = None) -> tuple[str, str]:
    """Index every image under ``images_dir`` into ``index_dir`` (new, or resumed); returns (index_dir, status)."""
    from densekit.retrieval.segment_index import DB_NAME, SegmentIndex, list_images

    if not images_dir or not str(images_dir).strip():
        raise DensekitError("Give the images folder to index.")
    files = list_images(Path(str(images_dir).strip()).expanduser())
    root = (
        Path(str(index_dir).strip()).expanduser() if index_dir and str(index_dir).strip() else engine.new_dir("index")
    )
    if (root / DB_NAME).is_file():
        idx = engine.open_index(root)
    else:
        idx = SegmentIndex.create(root, engine.extractor)
    try:
        done = [0]

        def tick(_name: str, _added: bool) -> None:
            done[0] += 1
            if progress is not None:
                progress((done[0], len(files)), desc="indexing")

        report = idx.add_images(files, progress=tick)
        total, segments = len(idx), idx.n_segments
    finally:
        idx.close()
    skipped = [r for _, r in report.skipped if r != "already indexed"]
    status = (
        f"Index {root}: added {len(report.added)} images ({report.segments} segments), {len(skipped)} skipped; "
        f"{total} images, {segments} segments in all. Click a region of a query image to search."
    )
    return str(root), status
