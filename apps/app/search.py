"""The Search tab's work: build or update a segment index from a folder, search by a click on a query image.

A click searches with the connected segment under it; hits in the query's own image are left out unless asked
for; each hit's segment is outlined and boxed on its thumbnail."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from densekit.apps.app.display import DISPLAY_MAX_SIDE, downscale
from densekit.apps.app.engine import Engine
from densekit.serve.errors import DensekitError
from densekit.serve.viz import HIT_COLOUR, QUERY_COLOUR, outline


SAME_IMAGE_DIFF = 1.0  # mean grey-level difference of 32x32 thumbnails under which two pictures are one image
EXTRA_HITS = 16  # hits asked for beyond k when the query's own image is left out (its segments come first)


def _thumb(image: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether (H, W, 3) pictures ``a`` and ``b`` are one image: same size and nearly equal pixels.

    An uploaded query reaches the app as decoded pixels in a copy of the file, so neither its path nor
    its bytes name the indexed file; a size check plus a thumbnail difference does, also after the
    picture was re-encoded (JPEG noise averages out in a 32x32 thumbnail; neighbouring video frames do not).
    """
    if a.shape[:2] != b.shape[:2]:
        return False
    return bool(np.abs(_thumb(a) - _thumb(b)).mean() < SAME_IMAGE_DIFF)


def connected_cells(cells: np.ndarray, row: int, col: int) -> np.ndarray:
    """The connected part (8-neighbourhood) of the (h, w) bool ``cells`` that holds cell (row, col).

    A point's K-means segment is a cluster of features, so it can be scattered patches over the picture;
    what was clicked is the piece under the click. A click on no cell of it keeps ``cells`` as they are.
    """
    from scipy import ndimage

    lab, _ = ndimage.label(cells, structure=np.ones((3, 3), bool))
    return lab == lab[row, col] if lab[row, col] > 0 else cells


def _query_picture(image: Any) -> tuple[np.ndarray, Optional[str]]:
    """The query as (H, W, 3) uint8 RGB and its file path when it was given as one."""
    from densekit.serve.imageio import read_image

    if image is None:
        raise DensekitError("Choose a query image first.")
    path = str(Path(str(image)).expanduser().resolve()) if isinstance(image, (str, Path)) else None
    arr = read_image(path) if path else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DensekitError("the query must be an RGB image")
    return np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8), path


def _hit_picture(img: np.ndarray, hit: Any) -> np.ndarray:
    """The hit image with its segment outlined and boxed (a small segment stays findable in a thumbnail)."""
    import cv2

    out = outline(img, hit.mask)
    x0, y0, x1, y1 = (int(v) for v in hit.box)
    cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), HIT_COLOUR, max(1, round(max(img.shape[:2]) / 300)))
    return downscale(out, 320)


def search_point(
    engine: Engine, index_dir: Any, image: Any, x: Any, y: Any, k: int = 8, exclude_query: bool = True
) -> tuple[list[tuple[np.ndarray, str]], np.ndarray, str]:
    """Segments nearest to the connected segment under (x, y) of the query: (gallery items, query picture, status).

    ``image``: (H, W, 3) pixels or a file path. ``exclude_query``: leave out hits in the query's own image
    (the same path, or the same picture by :func:`same_image`), which would otherwise be the best hits.
    """
    import cv2

    from densekit.serve.imageio import read_image

    engine.index_root(index_dir)  # no index: say so before anything else
    arr, query_path = _query_picture(image)
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
        n_images = len(idx)
        want = min(idx.n_segments, k + EXTRA_HITS) if exclude_query else k
        found = idx.query_region(arr, point=pt, k=want)
        h, w = found.cells.shape
        piece = connected_cells(found.cells, min(int(pt[1] * h / H), h - 1), min(int(pt[0] * w / W), w - 1))
        if not np.array_equal(piece, found.cells):  # search for the piece that was clicked only
            found = idx.query_region(arr, mask=cv2.resize(piece.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST), k=want)
    finally:
        idx.close()
    items: list[tuple[np.ndarray, str]] = []
    left_out = 0
    for hit in found.hits:
        if len(items) == k:
            break
        name = Path(hit.path).name if hit.path else f"image {hit.image_id}"
        try:
            img = read_image(hit.path) if hit.path else None
        except DensekitError:
            img = None  # moved or deleted since it was indexed
        if exclude_query and (
            (query_path and hit.path and str(Path(hit.path).resolve()) == query_path)
            or (img is not None and same_image(img, arr))
        ):
            left_out += 1
            continue
        if img is None or img.shape[:2] != hit.mask.shape:
            img = np.full((*hit.mask.shape, 3), 40, np.uint8)
        items.append((_hit_picture(img, hit), f"#{len(items) + 1} score {hit.score:.3f} · {name}"))
    query = downscale(outline(arr, found.mask, QUERY_COLOUR), DISPLAY_MAX_SIDE)
    status = f"{len(items)} nearest segments among {n_images} indexed images (query region outlined in yellow"
    status += f"; {left_out} hits in the query's own image left out)." if exclude_query else ")."
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
