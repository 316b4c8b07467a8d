"""densekit.retrieval.davis_eval against two references: the plain transcription of the official
davis2017-evaluation semantics (tests/_davis_reference.py) and vos-benchmark (PyPI, hkchengrex)
where its semantics coincide with the official ones."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _davis_reference as ref  # noqa: E402

from densekit.retrieval import davis_eval as de  # noqa: E402
from densekit.serve.errors import DensekitError  # noqa: E402

STATS = ("j_mean", "j_recall", "j_decay", "f_mean", "f_recall", "f_decay")
TOL = 1e-12  # the brief asks for 1e-6; the integer counts make the numbers bit-identical


def _random_case(rng: np.random.Generator, h: int, w: int, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    gt = ref.blobby_sequence(rng, t, h, w, n)
    if not (gt[0] == n).any():  # make the first frame define n objects
        gt[0][h // 2, w // 2] = n
    pred = ref.perturb(rng, gt, n)
    return gt, pred


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 2), (5, 9), (17, 12)])
def test_seg2bmap_matches_per_pixel_definition(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.2, 0.5, 0.9, 1.0):
        seg = rng.random(shape) < density
        np.testing.assert_array_equal(de.seg2bmap(seg), ref.plain_seg2bmap(seg))


def test_seg2bmap_last_row_and_column_rules() -> None:
    seg = np.zeros((4, 5), bool)
    seg[3, 4] = True  # bottom-right pixel: never on the boundary itself; its W, N, NW neighbours are
    assert sorted(zip(*np.nonzero(de.seg2bmap(seg)))) == [(2, 3), (2, 4), (3, 3)]
    seg[:] = True  # full frame: no boundary anywhere (the frame border is not an edge)
    assert not de.seg2bmap(seg).any()
    seg[:] = False
    seg[3, 1] = True  # on the last row only the east neighbour counts
    b = de.seg2bmap(seg)
    assert b[3, 0] and b[3, 1] and b[2, 0] and b[2, 1] and b.sum() == 4


def test_tolerance_is_eight_pixels_at_480p() -> None:
    assert de.boundary_tolerance((480, 854)) == 8.0
    assert de.boundary_tolerance((480, 854), bound_th=3) == 3.0


@pytest.mark.parametrize(
    "gt_px, pred_px, expect_j, expect_f",
    [
        ([], [], 1.0, 1.0),  # empty union -> J = 1; no boundaries -> P = R = 1
        ([(5, 5)], [], 0.0, 0.0),  # no prediction: P = 1, R = 0
        ([], [(5, 5)], 0.0, 0.0),  # nothing to find: P = 0, R = 1
        ([(5, 5)], [(5, 5)], 1.0, 1.0),
        ([(11, 13)], [(11, 13)], 1.0, 1.0),  # bottom-right pixel (its boundary lies on the neighbours)
        ([(11, 13)], [(0, 0)], 0.0, 0.0),  # boundaries further apart than the 1-px tolerance
    ],
)
def test_frame_edge_cases(gt_px: list, pred_px: list, expect_j: float, expect_f: float) -> None:
    gt = np.zeros((12, 14), bool)
    pred = np.zeros((12, 14), bool)
    for y, x in gt_px:
        gt[y, x] = True
    for y, x in pred_px:
        pred[y, x] = True
    assert de.db_eval_iou(gt, pred) == expect_j == ref.plain_iou(gt, pred)
    assert de.f_measure(pred, gt) == expect_f == ref.plain_f_measure(pred, gt)


def test_frame_metrics_match_reference_on_random_blobs() -> None:
    rng = np.random.default_rng(3)
    for trial in range(60):
        h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        gt = ref.blobby_sequence(rng, 1, h, w, 1)[0] > 0
        pred = ref.perturb(rng, gt[None].astype(np.uint8), 1)[0] > 0
        if trial % 7 == 0:
            pred = np.zeros_like(pred)
        assert abs(de.db_eval_iou(gt, pred) - ref.plain_iou(gt, pred)) <= TOL
        assert abs(de.f_measure(pred, gt) - ref.plain_f_measure(pred, gt)) <= TOL
        assert abs(de.db_eval_boundary(gt, pred) - ref.plain_f_measure(pred, gt)) <= TOL


def test_boundary_tolerance_reaches_exactly_the_disk() -> None:
    # Two single-row segments whose boundaries are exactly d apart: matched iff d <= 8 at 480x854.
    for d, matched in ((8, True), (9, False)):
        gt = np.zeros((480, 854), bool)
        pred = np.zeros((480, 854), bool)
        gt[100:200, 100:300] = True
        pred[100 + d : 200 + d, 100:300] = True
        f_far = de.f_measure(pred, gt)
        assert f_far == ref.plain_f_measure(pred, gt)
        # horizontal edges match, so F is above 0 either way; the vertical edges decide 1.0
        assert (f_far == 1.0) == matched


def test_db_eval_iou_stack() -> None:
    rng = np.random.default_rng(5)
    gt = rng.random((4, 9, 11)) < 0.3
    pred = rng.random((4, 9, 11)) < 0.3
    gt[2] = pred[2] = False
    j = de.db_eval_iou(gt, pred)
    assert j.shape == (4,) and j[2] == 1.0
    np.testing.assert_allclose(j, [ref.plain_iou(g, p) for g, p in zip(gt, pred)], rtol=0, atol=TOL)


def test_statistics_decay_bins_by_hand() -> None:
    v = np.arange(10, dtype=float) / 10
    # linspace(1, 10, 5) = [1, 3.25, 5.5, 7.75, 10] -> round -> [1, 3, 6, 8, 10] -> -1 -> [0, 2, 5, 7, 9]
    mean, recall, decay = de.db_statistics(v)
    assert mean == pytest.approx(0.45)
    assert recall == pytest.approx(0.4)  # 0.6, 0.7, 0.8, 0.9 are > 0.5 (0.5 itself is not)
    assert decay == pytest.approx(np.mean(v[0:3]) - np.mean(v[7:10]))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 33, 255, 256, 257, 300, 600])
def test_statistics_match_reference(n: int) -> None:
    v = np.random.default_rng(n).random(n)
    np.testing.assert_array_equal(de.db_statistics(v), ref.plain_statistics(v))  # NaN == NaN here


# ------------------------------------------------------------------------------------------------
# Sequences from arrays
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_sequence_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(7, 60)) * 2 + 1, int(rng.integers(7, 60)) * 2 + 1  # odd sizes
    n = int(rng.integers(1, 5))
    gt, pred = _random_case(rng, h, w, int(rng.integers(3, 12)), n)
    if seed % 2:
        gt[1:, : h // 4, : w // 4] = 255  # void band: ignored (set to 0)
        gt[2][gt[2] == 1] = n + 3  # an id unknown to the first frame: belongs to no object
        pred[1][:] = 0  # an empty prediction frame
    if seed % 3 == 0 and n > 1:
        pred[pred == n] = 0  # the last object is never predicted: zero padding
    got = de.evaluate_sequence(gt, pred)
    j, f = ref.plain_evaluate_sequence(gt, pred)
    assert got.j.shape == j.shape == (n, gt.shape[0] - 2)
    np.testing.assert_allclose(got.j, j, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.f, f, rtol=0, atol=TOL)
    threaded = de.evaluate_sequence(gt, pred, workers=2)
    np.testing.assert_array_equal(threaded.j, got.j)
    np.testing.assert_array_equal(threaded.f, got.f)


def test_sequence_objects_touching_the_border() -> None:
    rng = np.random.default_rng(7)
    gt = np.zeros((5, 31, 40), np.uint8)
    gt[:, -6:, :] = 1  # bottom rows: the last-row rule of seg2bmap matters
    gt[:, :, -5:] = 2  # right columns: the last-column rule
    gt[:, :4, :4] = 3  # top-left corner
    gt[:, -1, -1] = 4  # bottom-right pixel alone
    pred = ref.perturb(rng, gt, 4, drop=False)
    pred[:, -1, :] = 1
    got = de.evaluate_sequence(gt, pred)
    j, f = ref.plain_evaluate_sequence(gt, pred)
    np.testing.assert_allclose(got.j, j, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.f, f, rtol=0, atol=TOL)


def test_sequence_first_frame_defines_objects_and_void() -> None:
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[0, 2:5, 2:5] = 255  # only void in the first frame -> no objects
    gt[1:, 2:5, 2:5] = 1
    got = de.evaluate_sequence(gt, np.zeros_like(gt))
    assert got.j.shape == (0, 2) and got.f.shape == (0, 2)
    gt[0, 0, 0] = 2  # ids 1 and 2 now; object 2 never appears later -> J = F = 1 with an empty prediction
    got = de.evaluate_sequence(gt, np.zeros_like(gt))
    np.testing.assert_array_equal(got.j, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(got.f, [[0, 0], [1, 1]])


def test_sequence_rejects_unknown_ids_only_in_scored_frames() -> None:
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[:, 3:6, 3:6] = 1
    pred = gt.copy()
    pred[0, 0, 0] = 9  # first and last frames are not read, as in the official evaluator
    pred[3, 0, 0] = 9
    de.evaluate_sequence(gt, pred)
    pred[2, 0, 0] = 2
    with pytest.raises(DensekitError, match="object id 2"):
        de.evaluate_sequence(gt, pred)
    with pytest.raises(DensekitError, match="at least 3"):
        de.evaluate_sequence(gt[:2], gt[:2])
    with pytest.raises(DensekitError, match="shape"):
        de.evaluate_sequence(gt, gt[:, :5])


# ------------------------------------------------------------------------------------------------
# Whole datasets on disk
# ------------------------------------------------------------------------------------------------


def _assert_same_as_plain(result: de.DavisEvalResult, plain: dict) -> None:
    for col in de.GLOBAL_COLUMNS:
        assert abs(result.global_row[col] - plain["global"][col]) <= TOL, col
    assert [o.name for o in result.objects] == list(plain["objects"])
    for o in result.objects:
        np.testing.assert_allclose([getattr(o, s) for s in STATS], plain["objects"][o.name], rtol=0, atol=TOL)
        pj, pf = plain["frames"][o.name]
        np.testing.assert_allclose(o.j, pj, rtol=0, atol=TOL)
        np.testing.assert_allclose(o.f, pf, rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    tmp = tmp_path_factory.mktemp("davis17")
    gts, preds = {}, {}
    for i, (h, w, n) in enumerate([(61, 97, 3), (48, 33, 1), (75, 64, 4), (40, 51, 2)]):
        gt, pred = _random_case(rng, h, w, 7 + i, n)
        if i == 2:
            gt[1:, :5, :] = 255
        gts[f"seq{i}"], preds[f"seq{i}"] = gt, pred
    root = ref.make_davis2017_root(tmp / "DAVIS", gts)
    results = ref.write_results(tmp / "results", preds)
    return root, results, gts, preds


def test_dataset_matches_reference(synthetic: tuple) -> None:
    root, results, gts, _ = synthetic
    plain = ref.plain_evaluate_folders(root / "Annotations" / "480p", results, list(gts))
    serial = de.evaluate_davis(root, results, split="val", workers=1)
    pooled = de.evaluate_davis(root, results, split="val", workers=2)
    _assert_same_as_plain(serial, plain)
    _assert_same_as_plain(pooled, plain)
    assert serial.sequences == tuple(gts)
    assert len(serial.objects) == 3 + 1 + 4 + 2
    only = de.evaluate_davis(root, results, sequences=["seq1"])
    assert [o.name for o in only.objects] == ["seq1_1"]


def test_dataset_first_and_last_result_frames_are_optional(synthetic: tuple, tmp_path: Path) -> None:
    root, _, gts, preds = synthetic
    res = ref.write_results(tmp_path / "res", preds)
    for s, p in preds.items():
        (res / s / "00000.png").unlink()
        (res / s / f"{p.shape[0] - 1:05d}.png").unlink()
    full = de.evaluate_davis(root, synthetic[1], workers=1)
    trimmed_result = de.evaluate_davis(root, res, workers=1)
    assert full.global_row == trimmed_result.global_row


def test_dataset_errors(synthetic: tuple, tmp_path: Path) -> None:
    root, _, gts, preds = synthetic
    res = ref.write_results(tmp_path / "res", preds)
    (res / "seq0" / "00003.png").unlink()
    with pytest.raises(DensekitError, match=r"missing result frame .*seq0.00003\.png"):
        de.evaluate_davis(root, res, workers=2)
    ref.save_ids_png(res / "seq0" / "00003.png", preds["seq0"][3][:, :-1])
    with pytest.raises(DensekitError, match="00003.png is 96x61 but the ground truth is 97x61"):
        de.evaluate_davis(root, res, workers=1)
    bad = preds["seq0"][3].copy()
    bad[0, 0] = 4  # seq0 has 3 objects
    ref.save_ids_png(res / "seq0" / "00003.png", bad)
    with pytest.raises(DensekitError, match="object id 4 .* only 3 object"):
        de.evaluate_davis(root, res, workers=2)
    Image.fromarray(np.zeros((61, 97, 3), np.uint8)).save(res / "seq0" / "00003.png")
    with pytest.raises(DensekitError, match="indexed or grayscale"):
        de.evaluate_davis(root, res, workers=1)
    shutil.rmtree(res / "seq1")
    with pytest.raises(DensekitError, match="results for sequence 'seq1' not found"):
        de.evaluate_davis(root, res)


def test_gt_reader_follows_the_binary_mask_rule(tmp_path: Path) -> None:
    """GT frames are read with read_mask: {0, 255} grayscale -> {0, 1}, anything else as ids."""
    from densekit.serve.imageio import read_mask

    def expected(g: np.ndarray) -> np.ndarray:
        vals = set(np.unique(g).tolist())
        return (g == 255).astype(np.uint8) if 255 in vals and vals <= {0, 255} else g

    rng = np.random.default_rng(9)
    ids = (rng.random((13, 17)) * 4).astype(np.uint8)
    binary = np.where(ids > 1, 255, 0).astype(np.uint8)
    cases = {
        "palette.png": Image.fromarray(ids, mode="P"),
        "binary.png": Image.fromarray(binary, mode="L"),
        "empty.png": Image.fromarray(np.zeros_like(ids), mode="L"),
        "gray_ids.png": Image.fromarray(ids, mode="L"),
        "gray_mixed.png": Image.fromarray(np.where(ids == 1, 255, ids).astype(np.uint8), mode="L"),
        "alpha.png": Image.fromarray(np.stack([binary, binary], -1), mode="LA"),
        "bilevel.png": Image.fromarray(binary, mode="L").convert("1"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        got = read_mask(tmp_path / name)
        raw = np.array(Image.open(tmp_path / name).convert("L") if name == "alpha.png" else Image.open(tmp_path / name))
        want = raw.astype(np.uint8) if name in ("palette.png", "bilevel.png") else expected(raw)
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.dtype == np.uint8
    with pytest.raises(DensekitError):
        read_mask(tmp_path / "missing.png")


def test_csvs_plot_and_tables(synthetic: tuple, tmp_path: Path) -> None:
    root, results, _, _ = synthetic
    result = de.evaluate_davis(root, results, split="val")
    g_path, s_path = de.write_csvs(result, tmp_path / "out", "val")
    assert g_path.name == "global_results-val.csv" and s_path.name == "per-sequence_results-val.csv"
    rows = list(csv.reader(g_path.open()))
    assert rows[0] == list(de.GLOBAL_COLUMNS)
    g = result.global_row
    assert rows[1] == ["%.3f" % g[c] for c in de.GLOBAL_COLUMNS]
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2)
    seq_rows = list(csv.reader(s_path.open()))
    assert seq_rows[0] == ["Sequence", "J-Mean", "F-Mean"]
    assert [r[0] for r in seq_rows[1:]] == [f"seq0_{k}" for k in (1, 2, 3)] + ["seq1_1"] + [
        f"seq2_{k}" for k in (1, 2, 3, 4)
    ] + ["seq3_1", "seq3_2"]
    first = result.objects[0]
    assert seq_rows[1][1:] == ["%.3f" % first.j_mean, "%.3f" % first.f_mean]

    png = de.plot_per_sequence(result, tmp_path / "out" / "per_sequence.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["global_results-val.csv", "per-sequence_results-val.csv", "per_sequence.png"]
    )  # atomic writes leave no temporary files behind

    text = de.format_table(result)
    assert "J&F-Mean" in text and "seq2_4" in text and f"{g['J&F-Mean']:.3f}" in text
    from rich.console import Console

    console = Console(record=True, width=120)
    for table in de.rich_tables(result):
        console.print(table)
    rendered = console.export_text()
    assert "seq3_2" in rendered and f"{g['F-Decay']:.3f}" in rendered


# ------------------------------------------------------------------------------------------------
# vos-benchmark (second, independent implementation)
#
# vos-benchmark 0.1.0 (vos_benchmark/evaluator.py, benchmark.py) uses the official per-frame J and F
# (its seg2bmap and f-measure are the official code) but differs in bookkeeping:
# * objects = every id seen in the GT of the *scored* frames (official: 1..max id of the first GT
#   frame), so ids that only appear later are scored, and gaps in the first frame's ids are not;
# * an object's frame list starts at the first scored frame where it shows up in GT or prediction
#   (official: all scored frames; frames where both masks are empty count as J = F = 1);
# * 255 is an ordinary id (official: void -> 0), so DAVIS-2016 0/255 GT must be converted first;
# * predicted ids above the GT objects are ignored (official: fatal);
# * only J-Mean and F-Mean (x100), no recall or decay; global = mean over objects, like the official.
# It therefore agrees with the official numbers when every object 1..N is present in the GT of the
# first scored frame, no other GT ids occur and there is no void; the tests compare it there.
# ------------------------------------------------------------------------------------------------


def _vos_scores(gt: np.ndarray, pred: np.ndarray) -> tuple[dict[int, float], dict[int, float]]:
    """vos-benchmark's per-object J and F means (in [0, 1]) over frames 1..T-2."""
    evaluator_mod = pytest.importorskip("vos_benchmark.evaluator")
    ev = evaluator_mod.Evaluator()
    for t in range(1, gt.shape[0] - 1):
        ev.feed_frame(pred[t], gt[t])
    iou, bf = ev.conclude()
    return {k: v / 100 for k, v in iou.items()}, {k: v / 100 for k, v in bf.items()}


@pytest.mark.parametrize("seed", range(4))
def test_matches_vos_benchmark_where_semantics_agree(seed: int) -> None:
    # vos-benchmark agrees with the official evaluator when every object 1..N is in the GT of the
    # first scored frame, no other GT ids appear and there is no void (see the next test).
    rng = np.random.default_rng(200 + seed)
    h, w, n = int(rng.integers(20, 90)), int(rng.integers(20, 90)), int(rng.integers(1, 4))
    gt = np.zeros((int(rng.integers(4, 10)), h, w), np.uint8)
    for k in range(1, n + 1):  # disjoint horizontal bands, so no object is ever fully occluded
        band = ref.blobby_sequence(rng, gt.shape[0], h, w, 1, always_present=True)[:, :, :]
        lo, hi = (k - 1) * w // n, k * w // n
        gt[:, :, lo:hi] = np.where(band[:, :, lo:hi] > 0, k, gt[:, :, lo:hi])
        gt[:, h // 2, lo + (hi - lo) // 2] = k
    pred = ref.perturb(rng, gt, n)
    ours = de.evaluate_sequence(gt, pred)
    vos_j, vos_f = _vos_scores(gt, pred)
    assert sorted(vos_j) == list(range(1, n + 1))
    for k in range(1, n + 1):
        assert abs(ours.j[k - 1].mean() - vos_j[k]) <= 1e-9
        assert abs(ours.f[k - 1].mean() - vos_f[k]) <= 1e-9


def test_vos_benchmark_differs_when_an_object_appears_late() -> None:
    # Documented difference: vos-benchmark starts an object's frame list at the first frame in which
    # the object shows up (in GT or prediction); the official evaluator scores every frame, and frames
    # where both masks are empty count as J = F = 1.
    gt = np.zeros((6, 30, 30), np.uint8)
    gt[0, 5:10, 5:10] = 1  # present in the first (unscored) frame, absent in scored frames 1-2
    gt[3:, 5:10, 5:10] = 1
    pred = gt.copy()
    pred[3:, 5:10, 5:8] = 0  # partial prediction once it is back
    ours = de.evaluate_sequence(gt, pred)
    j_plain, _ = ref.plain_evaluate_sequence(gt, pred)
    np.testing.assert_array_equal(ours.j, j_plain)
    assert list(ours.j[0]) == [1.0, 1.0, 0.4, 0.4]
    vos_j, _ = _vos_scores(gt, pred)
    assert vos_j[1] == pytest.approx(0.4)  # only the two frames after the object appeared
    assert ours.j[0].mean() == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------
# Real DAVIS-2016 masks
# ------------------------------------------------------------------------------------------------


def test_davis2016_mini_matches_references(davis2016_mini: Path, tmp_path: Path) -> None:
    from densekit.serve.davis import DavisRoot

    davis = DavisRoot(davis2016_mini)
    rng = np.random.default_rng(0)
    seqs = davis.sequences("train")
    preds, names, gts = {}, {}, {}
    for s in seqs:
        gts[s] = davis.read_gt(s)
        assert set(np.unique(gts[s]).tolist()) <= {0, 1}  # 0/255 masks become id 1
        preds[s] = ref.perturb(rng, gts[s], 1)
        names[s] = [p.stem for p in davis.annotation_paths(s)]
    results = ref.write_results(tmp_path / "results", preds, names)
    ours = de.evaluate_davis(davis2016_mini, results, split="train")
    plain = ref.plain_evaluate_folders(davis.annotations_dir, results, seqs, binary_gt=True)
    _assert_same_as_plain(ours, plain)
    assert 0.3 < ours.global_row["J-Mean"] < 0.999  # a perturbed GT: good but not perfect
    for s in seqs:  # vos-benchmark agrees here: one object, present in every frame
        vos_j, vos_f = _vos_scores(gts[s], preds[s])
        obj = next(o for o in ours.objects if o.sequence == s)
        assert abs(obj.j_mean - vos_j[1]) <= 1e-9 and abs(obj.f_mean - vos_f[1]) <= 1e-9


# ------------------------------------------------------------------------------------------------
# One protocol: the trainer's hook, `densekit eval davis` and score_davis agree
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_hook_and_cli_give_one_jf(davis2016_mini: Path, tmp_path: Path) -> None:
    """One checkpoint, preset, short side and root: the J&F that training logs (``eval.davis`` hook) is
    the J&F ``densekit eval davis`` prints, to the last bit. (They once resized differently: the hook
    0.657, the command 0.649 here.)"""
    from densekit.apps.cli import main
    from densekit.retrieval.backbone_eval import davis_jf_for_config
    from densekit.serve.checkpoint import save_checkpoint
    from densekit.serve.loader import load_backbone
    from densekit.train.config import build_config

    ckpt = tmp_path / "lite0.safetensors"
    save_checkpoint(load_backbone("efficientnet_lite0"), ckpt)
    ev = build_config(overrides=[f"eval.davis={davis2016_mini}", "eval.split=train", "eval.preset=dino",
                                 "eval.short_side=240"]).eval
    hook = davis_jf_for_config(load_backbone(ckpt), ev, "cpu")

    out = tmp_path / "cli"
    assert main(["eval", "davis", str(davis2016_mini), "--out", str(out), "--backbone", str(ckpt),
                 "--split", "train", "--preset", "dino", "--short-side", "240"]) == 0
    with open(out / "global_results-train.csv", newline="") as handle:
        printed = next(csv.DictReader(handle))
    assert printed["J&F-Mean"] == f"{hook['J&F']:.3f}" and printed["J-Mean"] == f"{hook['J']:.3f}"
    # the CSV keeps 3 decimals: rescoring the command's masks gives its full-precision J&F
    rescored = de.evaluate_davis(davis2016_mini, out, split="train").global_row
    assert (rescored["J&F-Mean"], rescored["J-Mean"], rescored["F-Mean"]) == (hook["J&F"], hook["J"], hook["F"])
    assert 0.3 < hook["J&F"] < 1.0  # pretrained features track: a real score, not two equal failures


def test_score_davis_is_the_protocol_of_the_hook_and_the_command(tmp_path: Path) -> None:
    """On a small sample (no shared data needed): the hook, the command and score_davis itself give one
    J&F; frames are processed at the config's size and masks come back at the frames' own size."""
    from densekit.apps.cli import main
    from densekit.retrieval.backbone_eval import davis_jf
    from densekit.retrieval.davis_protocol import score_davis
    from densekit.retrieval.propagation import preset, processing_size
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import read_mask
    from densekit.serve.loader import load_backbone
    from densekit.serve.sample import make_sample

    # (the old hook's resizing scored this sample 0.4430, the command 0.4397)
    root = make_sample(tmp_path / "sample", sequences=3, frames=8, height=120, width=200, seed=0)
    ext = FeatureExtractor("pixels")
    score = score_davis(ext, root, preset("crw", short_side=80), tmp_path / "direct", split="val")
    hook = davis_jf(load_backbone("pixels"), root, split="val", preset="crw", short_side=80)
    assert main(["eval", "davis", str(root), "--out", str(tmp_path / "cli"), "--backbone", "pixels",
                 "--split", "val", "--preset", "crw", "--short-side", "80"]) == 0
    cli = de.evaluate_davis(root, tmp_path / "cli", split="val").global_row
    assert score.summary() == hook == {"J&F": cli["J&F-Mean"], "J": cli["J-Mean"], "F": cli["F-Mean"]}
    assert score.csvs[0].name == "global_results-val.csv" and score.csvs[0].is_file()
    assert 0.2 < score.jf < 1.0  # pixels track these textured objects part of the way: a real score
    want = processing_size(120, 200, score.config, ext.meta.input_multiple)
    assert want[0] == 80 and set(score.processing_sizes.values()) == {want}
    seq = score.sequences[0]
    assert read_mask(tmp_path / "direct" / seq / "00003.png").shape == (120, 200)
    assert score.frames == 8 * len(score.sequences)
