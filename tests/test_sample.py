from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from densekit.serve.davis import DavisRoot
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import read_image, read_mask
from densekit.serve.sample import CLASSES, make_sample, plan_sample, render_sequence

SMALL = dict(sequences=3, frames=8, height=120, width=216)


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory) -> Path:
    """The default-size sample (what `densekit` ships as its embedded dataset)."""
    return make_sample(tmp_path_factory.mktemp("sample") / "davis", seed=0)


def _meta(root: Path) -> dict:
    return json.loads((root / "sample.json").read_text())


def _masks(root: Path, kind: str, seq: str) -> np.ndarray:
    return np.stack([read_mask(p) for p in sorted((root / kind / "480p" / seq).glob("*.png"))])


def test_layout_is_davis2017(default_sample):
    d = DavisRoot(default_sample)
    meta = _meta(default_sample)
    assert d.year == 2017
    train, val = d.sequences("train"), d.sequences("val")
    assert len(train) + len(val) == 6 and not set(train) & set(val)
    assert sorted(train + val) == d.sequences() == sorted(v["name"] for v in meta["videos"])
    assert len(val) == 2  # round(0.34 * 6)
    assert meta["complete"] is True and meta["seed"] == 0 and meta["frames"] == 24
    for seq in d.sequences():
        frames = d.frame_paths(seq)
        assert len(frames) == 24 and len(d.annotation_paths(seq)) == 24
        img = read_image(frames[0])
        assert img.shape == (240, 432, 3)
        gt = d.read_gt(seq)
        assert gt.shape == (24, 240, 432)
    assert (default_sample / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert CLASSES[0] == "background"


def test_first_frame_ids_are_consecutive(default_sample):
    d = DavisRoot(default_sample)
    for v in _meta(default_sample)["videos"]:
        n = len(v["objects"])
        assert 1 <= n <= 4
        assert np.unique(d.first_mask(v["name"])).tolist() == list(range(n + 1))


def test_semantic_matches_instances(default_sample):
    meta = _meta(default_sample)
    classes = (default_sample / "classes.txt").read_text().splitlines()
    for v in meta["videos"]:
        lut = np.zeros(256, np.uint8)
        for o in v["objects"]:
            assert classes[o["class_id"]] == o["class"]
            lut[o["id"]] = o["class_id"]
        inst = _masks(default_sample, "Annotations", v["name"])
        sem = _masks(default_sample, "SemanticAnnotations", v["name"])
        assert sem.shape == inst.shape
        assert np.array_equal(sem, lut[inst])
        assert set(np.unique(sem).tolist()) <= set(range(len(classes)))


def test_objects_move(default_sample):
    meta = _meta(default_sample)
    short = min(meta["height"], meta["width"])
    for v in meta["videos"]:
        inst = _masks(default_sample, "Annotations", v["name"])
        for o in v["objects"]:
            cents = []
            for m in inst:
                ys, xs = np.nonzero(m == o["id"])
                if len(xs) >= 20:
                    cents.append((xs.mean(), ys.mean()))
            cents = np.array(cents)
            assert len(cents) >= 2, (v["name"], o)
            disp = np.linalg.norm(cents - cents[0], axis=1).max()
            assert disp > 0.1 * short, (v["name"], o["id"], disp)


def test_occlusion_and_leaving_present(default_sample):
    """Some video has two objects whose unoccluded shapes overlap (the nearer one wins the pixels),
    and some object leaves the frame (its id vanishes while its shape is outside the frame)."""
    meta = _meta(default_sample)
    plans = {p.name: p for p in plan_sample(6, 24, 240, 432, seed=0)}
    occlusions = 0
    left = 0
    for v in meta["videos"]:
        plan = plans[v["name"]]
        depth = {o["id"]: o["depth"] for o in v["objects"]}
        inst = _masks(default_sample, "Annotations", v["name"])
        for k, fr in enumerate(render_sequence(plan)):
            # The rendering the test re-runs is the one on disk.
            assert np.array_equal(fr.instance, inst[k])
            n = fr.amodal.shape[0]
            for a in range(n):
                if not fr.amodal[a].any():
                    assert not (inst[k] == a + 1).any()
                    left += 1
                for b in range(a + 1, n):
                    both = fr.amodal[a] & fr.amodal[b]
                    if both.sum() > 100:
                        farther = a + 1 if depth[a + 1] < depth[b + 1] else b + 1
                        # Hidden behind the nearer one (a third, nearer object may cover both).
                        assert not (inst[k][both] == farther).any()
                        occlusions += 1
    assert occlusions > 0
    assert left > 0


def test_instance_masks_are_exact_composites():
    """Visible mask of each object = its full shape minus every nearer object's shape."""
    (plan,) = plan_sample(1, 6, 120, 216, seed=3)
    order = sorted(plan.objects, key=lambda o: o.depth)
    for fr in render_sequence(plan):
        expect = np.zeros(fr.instance.shape, np.uint8)
        for o in order:
            expect[fr.amodal[o.obj_id - 1]] = o.obj_id
        assert np.array_equal(fr.instance, expect)
        assert fr.image.shape == fr.instance.shape + (3,) and fr.image.dtype == np.uint8
        # Objects are opaque: an object pixel's colour lies within its texture patch's range.
        for o in plan.objects:
            sel = fr.instance == o.obj_id
            if sel.sum() > 50:
                lo = o.texture.reshape(-1, 3).min(0).astype(int) - 2
                hi = o.texture.reshape(-1, 3).max(0).astype(int) + 2
                px = fr.image[sel].astype(int)
                assert ((px >= lo) & (px <= hi)).all()


def test_deterministic_by_seed(tmp_path):
    a = make_sample(tmp_path / "a", seed=5, **SMALL)
    b = make_sample(tmp_path / "b", seed=5, **SMALL)
    c = make_sample(tmp_path / "c", seed=6, **SMALL)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".png" or rel.suffix == ".txt":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        elif rel.suffix == ".jpg":
            diff = np.abs(read_image(a / rel).astype(int) - read_image(b / rel).astype(int))
            assert diff.max() <= 2, rel
    ja, jb = _meta(a), _meta(b)
    assert ja == jb
    jc = _meta(c)
    assert jc["seed"] == 6 and jc["videos"] != ja["videos"]
    seq_a = sorted((a / "Annotations" / "480p").iterdir())[0]
    seq_c = sorted((c / "Annotations" / "480p").iterdir())[0]
    assert (seq_a / "00003.png").read_bytes() != (seq_c / "00003.png").read_bytes()


def test_val_fraction_and_sizes(tmp_path):
    out = make_sample(tmp_path / "s", sequences=2, frames=4, height=96, width=128, seed=1, val_fraction=0.0)
    d = DavisRoot(out)
    assert len(d.sequences("val")) == 1 and len(d.sequences("train")) == 1  # at least one val
    assert read_image(d.frame_paths(d.sequences()[0])[0]).shape == (96, 128, 3)


def test_refuses_foreign_folder_and_overwrites_previous_sample(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DensekitError, match="not empty"):
        make_sample(foreign, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]

    out = make_sample(tmp_path / "s", sequences=2, frames=4, height=96, width=128, seed=0)
    first = sorted(p.name for p in (out / "JPEGImages" / "480p").iterdir())
    out = make_sample(out, sequences=1, frames=5, height=96, width=128, seed=2)
    seqs = sorted(p.name for p in (out / "JPEGImages" / "480p").iterdir())
    assert len(seqs) == 1 and len(first) == 2  # the old sample is gone, not merged
    assert len(list((out / "JPEGImages" / "480p" / seqs[0]).iterdir())) == 5
    assert _meta(out)["seed"] == 2
    assert not [p for p in out.rglob(".*")]  # no temp files

    (out / "extra.txt").write_text("user file")
    with pytest.raises(DensekitError, match="other files"):
        make_sample(out, **SMALL)
    assert (out / "extra.txt").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sequences=0),
        dict(frames=3),
        dict(height=10),
        dict(height=64, width=300),
        dict(seed=-1),
        dict(val_fraction=1.5),
        dict(val_fraction=float("nan")),
    ],
)
def test_bad_parameters(tmp_path, kwargs):
    with pytest.raises(DensekitError):
        make_sample(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
