"""Outlines and the search-hits sheet (densekit.serve.viz): what the app, `index search --grid` and the demo draw."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from densekit.serve.viz import HIT_COLOUR, QUERY_COLOUR, hits_sheet, outline, write_grid


@dataclass
class _Hit:
    image_id: int
    path: str | None
    score: float
    mask: np.ndarray


def _square(h: int = 60, w: int = 80) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[20:40, 30:50] = True
    return m


def test_outline_draws_only_around_the_mask_and_leaves_the_input() -> None:
    image = np.full((60, 80, 3), 100, np.uint8)
    out = outline(image, _square(), (255, 0, 0), thickness=1)
    red = np.all(out == (255, 0, 0), axis=2)
    assert (image == 100).all()  # a copy
    ring = _square() & ~ndimage.binary_erosion(_square())  # the square's border pixels
    assert np.array_equal(red, ring)
    assert outline(image, np.zeros((60, 80), bool)).tolist() == image.tolist()
    assert np.all(outline(np.zeros((400, 400, 3), np.uint8), np.ones((400, 400), bool))[0, 0] == HIT_COLOUR)


def test_sheet_tiles_query_then_hits_and_blanks_missing_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 90, (60, 80, 3), dtype=np.uint8)  # dark: no pixel is pure yellow or green by chance
    found = tmp_path / "found.png"
    assert cv2.imwrite(str(found), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    hits = [_Hit(3, str(found), 0.9, _square()), _Hit(4, str(tmp_path / "gone.png"), 0.5, _square())]
    sheet = hits_sheet(img, _square(), hits, tile=64, cols=2)
    assert sheet.shape == (128, 128, 3)
    query, first, second, filler = sheet[:64, :64], sheet[:64, 64:], sheet[64:, :64], sheet[64:, 64:]
    assert np.all(query == QUERY_COLOUR, axis=2).sum() > 20 and not np.all(query == HIT_COLOUR, axis=2).any()
    assert np.all(first == HIT_COLOUR, axis=2).sum() > 20
    assert not np.all(second == HIT_COLOUR, axis=2).any()  # its file is gone: an empty (labelled) tile
    assert (filler == 255).all()
    dest = tmp_path / "sub" / "grid.png"
    write_grid(dest, img, _square(), hits, tile=64, cols=2)
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(dest)), cv2.COLOR_BGR2RGB), sheet)
