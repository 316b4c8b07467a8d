"""Segment-retrieval and Hummingbird mIoU (densekit.retrieval.retrieval_eval) and ``densekit eval retrieval``.

Fast: synthetic label maps on small grids, an oracle extractor, and the ``pixels`` backbone on a tiny sample.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densekit.retrieval.retrieval_eval import (
    HummingbirdEval,
    ModeResult,
    RetrievalEvalConfig,
    SegmentRetrievalEval,
    cell_histograms,
    confusion_matrix,
    evaluate_retrieval,
    iou_from_confusion,
    open_labelled_set,
)
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import DAVIS_PALETTE, write_mask

STRIDE = 8
N_CLASSES = 4


# ------------------------------------------------------------------------------------------- helpers
def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) class grid of full-length bands (horizontal or vertical): no region corners, so bilinear
    upsampling of one-hot label maps cannot flip a pixel (a corner pixel of a convex region can)."""
    n = h if rng.random() < 0.5 else w
    cuts = np.sort(rng.choice(np.arange(1, n), size=3, replace=False))
    band = np.searchsorted(cuts, np.arange(n), side="right")
    classes = rng.permutation(N_CLASSES)[band % N_CLASSES]
    return np.repeat(classes[:, None], w, axis=1) if n == h else np.repeat(classes[None, :], h, axis=0)


def _gt_from_grid(grid: np.ndarray) -> np.ndarray:
    """Cell classes -> pixel classes (each cell a STRIDE x STRIDE block), first pixel row void."""
    gt = np.kron(grid, np.ones((STRIDE, STRIDE), np.int64)).astype(np.uint8)
    gt[0, :] = 255
    return gt


def _one_hot(grid: np.ndarray) -> np.ndarray:
    return np.eye(N_CLASSES, dtype=np.float32)[grid].transpose(2, 0, 1).copy()


def _random_feats(rng: np.random.Generator, h: int, w: int, d: int = 16) -> np.ndarray:
    f = rng.standard_normal((d, h, w)).astype(np.float32)
    return f / np.linalg.norm(f, axis=0, keepdims=True)


def _run(ev, train, val) -> ModeResult:
    for feats, gt in train:
        ev.add_train(feats, gt)
    for feats, gt in val:
        ev.add_val(feats, gt)
    return ev.result()


@pytest.fixture(scope="module")
def synthetic() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(7)
    grids = [_stripes(rng, 12, 16) for _ in range(10)]
    return grids[:7], grids[7:]


# ------------------------------------------------------------------------------------------- scoring
def test_confusion_and_miou_by_hand() -> None:
    gt = np.array([0, 0, 1, 1, 2, 255, 0])
    pred = np.array([0, 1, 1, 1, 0, 2, 3])
    conf = confusion_matrix(gt, pred, 4)
    # class 0: TP 1 (px 0), FN 2 (px 1 -> 1, px 6 -> 3), FP 1 (px 4); class 1: TP 2, FP 1 (px 1);
    # class 2: TP 0, FN 1, its FP at px 5 is void and not counted; class 3: only predicted (FP 1).
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[0, 3] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    np.testing.assert_array_equal(conf, expected)
    iou, present, miou = iou_from_confusion(conf)
    np.testing.assert_allclose(iou, [1 / 4, 2 / 3, 0.0, 0.0])
    np.testing.assert_array_equal(present, [True, True, True, False])
    assert miou == pytest.approx((1 / 4 + 2 / 3 + 0.0) / 3)  # class 3 is not in the ground truth
    assert ModeResult.from_confusion("x", conf, 0, 0.0).pixel_accuracy == pytest.approx(3 / 6)


def test_cell_histograms_and_void_handling() -> None:
    gt = np.array([[0, 0, 255, 255], [255, 1, 255, 255]], np.uint8)  # 2x4 pixels -> 1x2 cells
    hist, valid = cell_histograms(gt, 1, 2, 3)
    np.testing.assert_array_equal(valid, [True, False])  # the right cell is all void
    np.testing.assert_allclose(hist[0], [2 / 3, 1 / 3, 0])
    hist_bg, valid_bg = cell_histograms(gt, 1, 2, 3, void_in_memory="background")  # open-hummingbird's choice
    np.testing.assert_array_equal(valid_bg, [True, True])
    np.testing.assert_allclose(hist_bg, [[3 / 4, 1 / 4, 0], [1, 0, 0]])


def test_hummingbird_soft_labels_follow_softmax_over_k_neighbours() -> None:
    cfg = RetrievalEvalConfig(k=2, temperature=0.5)
    ev = HummingbirdEval(2, n_train_images=1, config=cfg)
    theta = 1.0
    feats = np.array([[1.0, math.cos(theta), -1.0], [0.0, math.sin(theta), 0.0]], np.float32)[:, None, :]  # (2, 1, 3)
    gt = np.kron(np.array([[0, 1, 1]]), np.ones((STRIDE, STRIDE), int)).astype(np.uint8)
    ev.add_train(feats, gt)
    soft = ev.predict_soft(np.array([[1.0], [0.0]], np.float32)[:, :, None])  # query = the first bank entry
    # the 2 nearest are the class-0 entry (sim 1) and the class-1 entry at angle theta (sim cos theta)
    w1 = math.exp((math.cos(theta) - 1.0) / 0.5)
    np.testing.assert_allclose(soft[0, 0], [1 / (1 + w1), w1 / (1 + w1)], rtol=1e-5)


# ----------------------------------------------------------------------------------------- protocols
@pytest.mark.parametrize("mode", ["segments", "hummingbird"])
def test_oracle_features_score_one_random_far_less(mode: str, synthetic) -> None:
    train_grids, val_grids = synthetic

    def make():
        cfg = RetrievalEvalConfig()
        return SegmentRetrievalEval(N_CLASSES, cfg) if mode == "segments" else HummingbirdEval(N_CLASSES, len(train_grids), cfg)

    oracle = _run(
        make(),
        [(_one_hot(g), _gt_from_grid(g)) for g in train_grids],
        [(_one_hot(g), _gt_from_grid(g)) for g in val_grids],
    )
    assert oracle.present.sum() == N_CLASSES
    assert oracle.miou == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    rand = _run(
        make(),
        [(_random_feats(rng, *g.shape), _gt_from_grid(g)) for g in train_grids],
        [(_random_feats(rng, *g.shape), _gt_from_grid(g)) for g in val_grids],
    )
    assert rand.miou < 0.5, rand.miou


def test_hummingbird_memory_cap_is_seeded(synthetic) -> None:
    train_grids, val_grids = synthetic
    rng = np.random.default_rng(1)
    train = [(_random_feats(rng, *g.shape), _gt_from_grid(g)) for g in train_grids]
    query = _random_feats(rng, *val_grids[0].shape)

    def soft(seed: int) -> tuple[int, np.ndarray]:
        ev = HummingbirdEval(N_CLASSES, len(train), RetrievalEvalConfig(memory_size=70, seed=seed))
        for f, g in train:
            ev.add_train(f, g)
        return ev.result().memory_entries, ev.predict_soft(query)

    n, a = soft(0)
    assert n == 70  # 10 per image, out of 12 x 16 - 16 (void row) valid cells each
    np.testing.assert_array_equal(a, soft(0)[1])
    assert not np.array_equal(a, soft(1)[1])


# ------------------------------------------------------------------------------------------ datasets
def _palette_rgb(c: int) -> np.ndarray:
    return np.asarray(DAVIS_PALETTE, np.uint8).reshape(-1, 3)[c + 1]  # skip black: class 0 gets a colour too


class ColourOracle:
    """An 'extractor' whose features are one-hot of the true class: the test images paint class c in
    palette colour c + 1, and each STRIDE x STRIDE cell is read at its centre pixel."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        centre = image[STRIDE // 2 :: STRIDE, STRIDE // 2 :: STRIDE].astype(int)
        colours = np.stack([_palette_rgb(c) for c in range(N_CLASSES)]).astype(int)
        cls = np.abs(centre[:, :, None, :] - colours[None, None]).sum(-1).argmin(-1)
        return _one_hot(cls)


def _write_voc(root: Path, grids: list[np.ndarray], splits: bool) -> list[str]:
    names = [f"img_{i:02d}" for i in range(len(grids))]
    for name, g in zip(names, grids, strict=True):
        gt = _gt_from_grid(g)
        rgb = np.stack([_palette_rgb(c) for c in range(N_CLASSES)])[np.where(gt == 255, 0, gt)]
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.png")
        write_mask(root / "SegmentationClass" / f"{name}.png", gt)
    (root / "classes.txt").write_text("".join(f"c{c}\n" for c in range(N_CLASSES)))
    if splits:
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        (sets / "train.txt").write_text("".join(f"{n}\n" for n in names[:7]))
        (sets / "val.txt").write_text("".join(f"{n}\n" for n in names[7:]))
    return names


def test_voc_layout_with_oracle_extractor_end_to_end(tmp_path: Path, synthetic) -> None:
    train_grids, val_grids = synthetic
    _write_voc(tmp_path / "voc", train_grids + val_grids, splits=True)
    report = evaluate_retrieval(tmp_path / "voc", ColourOracle())
    assert report.dataset["layout"] == "voc"
    assert (report.dataset["train_images"], report.dataset["val_images"]) == (7, 3)
    for mode in ("segments", "hummingbird"):
        assert report.modes[mode].miou == pytest.approx(1.0, abs=1e-12)


def test_voc_layout_without_imagesets_splits_every_third(tmp_path: Path, synthetic) -> None:
    train_grids, val_grids = synthetic
    names = _write_voc(tmp_path / "voc", (train_grids + val_grids)[:6], splits=False)
    data = open_labelled_set(tmp_path / "voc")
    assert [i.name for i in data.val] == [names[2], names[5]]
    assert "every third" in data.note
    with pytest.raises(DensekitError, match="no ImageSets"):
        open_labelled_set(tmp_path / "voc", split_train="trainaug")


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("reteval") / "sample", sequences=3, frames=4, height=64, width=96, seed=0)


def test_sample_layout_lists_every_annotated_frame(tiny_sample: Path) -> None:
    from densekit.serve.sample import CLASSES

    data = open_labelled_set(tiny_sample)
    assert data.layout == "davis-semantic" and data.classes == list(CLASSES)
    assert (len(data.train), len(data.val)) == (2 * 4, 1 * 4)
    assert not {i.name.split("/")[0] for i in data.train} & {i.name.split("/")[0] for i in data.val}
    assert len(open_labelled_set(tiny_sample, frame_step=2).train) == 2 * 2
    with pytest.raises(DensekitError, match="no split 'test'"):
        open_labelled_set(tiny_sample, split_val="test")


# ------------------------------------------------------------------------------------------------ CLI
def _cli(args: list[str]) -> int:
    from densekit.apps.cli import main

    return main(args)


def test_cli_end_to_end_on_sample(tiny_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from densekit.serve.sample import CLASSES

    out = tmp_path / "out"
    rc = _cli(["eval", "retrieval", str(tiny_sample), "--backbone", "pixels", "--segments", "6", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"segments", "hummingbird"}
    for m in metrics["modes"].values():
        assert 0.0 <= m["mIoU"] <= 1.0 and m["memory_entries"] > 0
    assert metrics["config"]["segments"] == 6 and metrics["config"]["k"] == 30
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(rows) == 2 * len(CLASSES)
    assert (out / "per_class_iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert "mIoU" in capsys.readouterr().out


def test_cli_bad_input_exit_2(tmp_path: Path, synthetic, capsys: pytest.CaptureFixture[str]) -> None:
    train_grids, val_grids = synthetic
    root = tmp_path / "voc"
    names = _write_voc(root, train_grids + val_grids, splits=True)
    bad = _gt_from_grid(train_grids[0])
    bad[5, 5] = 9  # classes.txt lists 4 classes
    write_mask(root / "SegmentationClass" / f"{names[1]}.png", bad)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("previous")
    cases = [
        [str(tmp_path / "missing")],
        [str(tmp_path)],  # no known layout
        [str(root), "--mode", "nearest"],
        [str(root), "--split-val", "test"],
        [str(root)],  # the bad mask
    ]
    for args in cases:
        rc = _cli(["eval", "retrieval", *args, "--backbone", "pixels", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (args, err)
        assert err.startswith("error: ") and "\n" not in err, err
    assert "class id 9" in err
    assert (out / "metrics.json").read_text() == "previous"  # nothing already written is lost


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from densekit.apps.cli import main\n"
        "rc = main(['eval', 'retrieval', '--help'])\n"
        "heavy = [m for m in ('torch', 'timm', 'cv2', 'skimage', 'matplotlib', 'faiss') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, (rc, heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--temperature" in res.stdout
