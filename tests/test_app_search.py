"""Search by a click (densekit.apps.app.search) without a server: the app's default model on a small index of
embedded sample frames. The query's own image is left out by default, the query region is the connected
piece under the click, and each hit thumbnail shows where its segment is."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from densekit.apps.app.search import build_index, connected_cells, same_image, search_point
from densekit.serve.errors import DensekitError


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(engine, index folder, {file name: (picture, instance mask)}) of 6 sample frames."""
    from PIL import Image

    from densekit.apps.app.engine import DEFAULT_MODEL, Engine, shared_extractor
    from densekit.serve.sample import plan_sample, render_sequence

    engine = Engine(shared_extractor(DEFAULT_MODEL), model_label=DEFAULT_MODEL, workdir=Path(tempfile.mkdtemp()))
    images = tmp_path_factory.mktemp("search") / "images"
    images.mkdir()
    frames = {}
    for plan in plan_sample(sequences=2, frames=10, height=144, width=256):
        for i, fr in enumerate(render_sequence(plan)):
            if i in (0, 5, 9):
                name = f"{plan.name}-{i}.png"
                Image.fromarray(fr.image).save(images / name)
                frames[name] = (fr.image, fr.instance)
    root, status = build_index(engine, images, images.parent / "index")
    assert "added 6 images" in status
    return engine, root, frames


def _centre(mask: np.ndarray) -> tuple[float, float]:
    import cv2

    dt = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return c + 0.5, r + 0.5


def test_the_query_image_is_left_out_by_default(indexed) -> None:  # noqa: ANN001
    engine, root, frames = indexed
    name = next(iter(frames))
    image, ids = frames[name]
    x, y = _centre(ids == 1)
    items, query, status = search_point(engine, root, image, x, y, k=5)
    captions = [c for _, c in items]
    assert len(items) == 5 and all(name not in c for c in captions), captions
    assert "hits in the query's own image left out" in status and not status.startswith("0 ")
    scores = [float(c.split("score ")[1].split(" ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True) and captions[0].startswith("#1 ")
    own = search_point(engine, root, image, x, y, k=5, exclude_query=False)[0]
    # its own segment first (the clicked piece of it: a K-means segment can be in pieces, so not always ~1)
    assert name in own[0][1] and float(own[0][1].split("score ")[1].split(" ")[0]) > 0.85
    # by path as well: the same file given by its name
    by_path = search_point(engine, root, str(Path(root).parent / "images" / name), x, y, k=5)[0]
    assert all(name not in c for _, c in by_path)


def test_hit_thumbnails_show_where_the_segment_is(indexed) -> None:  # noqa: ANN001
    engine, root, frames = indexed
    image, ids = next(iter(frames.values()))
    items, _, _ = search_point(engine, root, image, *_centre(ids == 1), k=3)
    for pic, _ in items:  # the outline and box are pure green (HIT_COLOUR); the sample photos have little
        green = (pic[:, :, 1] > 200) & (pic[:, :, 0] < 60) & (pic[:, :, 2] < 60)
        assert green.sum() > 40, green.sum()


def test_the_query_region_is_one_connected_piece_under_the_click(indexed) -> None:  # noqa: ANN001
    from scipy import ndimage

    engine, root, frames = indexed
    for image, ids in frames.values():
        for obj in np.unique(ids)[1:]:
            x, y = _centre(ids == obj)
            _, query, _ = search_point(engine, root, image, x, y, k=1)
            yellow = (query[:, :, 0] > 200) & (query[:, :, 1] > 200) & (query[:, :, 2] < 60)
            _, n = ndimage.label(ndimage.binary_fill_holes(ndimage.binary_closing(yellow, iterations=2)))
            assert n == 1, (obj, n)


def test_connected_cells_keeps_the_piece_under_the_click() -> None:
    cells = np.zeros((6, 8), bool)
    cells[1:3, 1:3] = True
    cells[4:6, 5:8] = True
    piece = connected_cells(cells, 5, 6)
    assert piece.sum() == 6 and piece[4:6, 5:8].all()
    assert np.array_equal(connected_cells(cells, 0, 0), cells)  # not on the segment: unchanged


def test_same_image_survives_reencoding_but_not_another_frame(indexed) -> None:  # noqa: ANN001
    import cv2

    _, _, frames = indexed
    (a, _), (b, _) = list(frames.values())[:2]
    ok, buf = cv2.imencode(".jpg", a[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    again = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    assert same_image(a, again) and not same_image(a, b) and not same_image(a, a[:-1])


def test_search_needs_an_index_and_a_picture(indexed, tmp_path: Path) -> None:  # noqa: ANN001
    engine, root, _ = indexed
    with pytest.raises(DensekitError, match="no segment index"):
        search_point(engine, tmp_path, np.zeros((8, 8, 3), np.uint8), 1, 1)
    with pytest.raises(DensekitError, match="Choose a query image"):
        search_point(engine, root, None, 1, 1)
