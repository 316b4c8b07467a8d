"""Semantic evaluation of dense features by retrieval: segment retrieval and Hummingbird dense NN.

Two protocols score how well frozen dense features carry semantic class, on a labelled set split into
train (the labelled memory) and val (the queries). Both transfer labels by nearest-neighbour search
(FAISS exact inner product on L2-normalised vectors) and are scored by mIoU (:func:`iou_from_confusion`).

**(a) Segment retrieval** (``mode="segments"``), after Zhang & Maire, "Self-Supervised Visual
Representation Learning from Hierarchical Grouping", NeurIPS 2020 (arXiv:2012.03044), Table 2, as the
densekit issue specifies it (the paper body was not readable from here; densekit notes ssl_training.md 1.6):

1. every image is cut into segments by K-means (K = 15) on its L2-normalised dense features: the very
   :func:`densekit.retrieval.segment_index.kmeans_segments` the segment index uses (no spatial term by
   default);
2. a segment's descriptor is its mean feature, L2-normalised
   (:func:`~densekit.retrieval.segment_index.region_descriptor`);
3. a train segment is labelled with the majority ground-truth class of its pixels. Void pixels (255)
   do not vote; a segment with only void pixels is left out of the memory;
4. each val segment takes the class of its single nearest train segment (inner product, ``k = 1``);
5. the predicted map (segment labels upsampled nearest from the feature grid to the image) is scored
   against the ground truth with a confusion matrix accumulated over the whole val set.

**(b) Hummingbird-style dense nearest-neighbour segmentation** (``mode="hummingbird"``): Balažević et
al., "Towards In-context Scene Understanding", NeurIPS 2023, with the semantics of the reference
re-implementation ``vpariza/open-hummingbird-eval`` (densekit notes propagation_retrieval.md section 3):

1. the memory bank holds train patch features (one per feature-grid cell), each labelled with the class
   histogram of the pixels it covers (normalised to sum 1);
2. the bank is capped at ``memory_size`` entries: each of the N train images contributes at most
   ``memory_size // N`` patches (open-hummingbird's per-image quota), drawn uniformly at random with a
   generator seeded by ``(seed, image number)``;
3. every val patch takes its ``k = 30`` nearest bank entries; weights = softmax(similarity / 0.02)
   over those k; its label = the weighted sum of their histograms;
4. the (h, w, C) label map is upsampled bilinearly (OpenCV, half-pixel centres, like torch
   ``align_corners=False``) to the image size, argmax gives the class, scored as in (a).

Deviations from open-hummingbird, stated so numbers are read with them: no augmentation epochs (one
pass over the train images, no crops or colour jitter); images keep their aspect ratio (longer side
resized to ``max_side`` = 512 when larger) instead of a 512 x 512 square; patches are sampled
uniformly within the per-image quota, not with its rarity-biased score; exact FAISS search instead of
ScaNN; void pixels are left out of patch histograms (``void_in_memory="ignore"``; an all-void patch is
not stored) where open-hummingbird maps void to background (``void_in_memory="background"`` does that);
and predicted classes are compared with the ground truth as they are (identity), not after Hungarian
matching, since retrieved labels are real class ids, not cluster ids.

**Scoring** (both modes). Pixels whose ground truth is void (``ignore_index`` = 255, the VOC convention)
are not scored. Per class c: IoU = TP / (TP + FP + FN) from the val-set confusion matrix (rows = ground
truth, columns = prediction). mIoU = mean IoU over the classes *present* in the val ground truth
(TP + FN > 0); a class that is only predicted still lowers the IoU of the classes it was confused with
but is not averaged itself (its IoU is reported as 0 in the per-class table, marked not present).

**Datasets** (:func:`open_labelled_set`): the semantic masks of ``densekit data sample`` (DAVIS-2017
layout plus ``SemanticAnnotations/<res>/<seq>/*.png`` and ``classes.txt``; splits are sequence lists
``ImageSets/2017/{train,val}.txt``, every annotated frame is an image) and the PASCAL VOC layout
(``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation/{train,val}.txt``, 255 = void; class
names from ``classes.txt`` or ``class_names.txt``, else the 21 VOC names). A VOC-layout folder without
``ImageSets/Segmentation`` (e.g. the three-image ``voc-mini``) gets a deterministic split: sorted by
name, every third image is val.

Features are extracted once per image and fed to both modes (streaming: one image's features are in
memory at a time, plus the memories).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import IMAGE_SUFFIXES

__all__ = [
    "MODES",
    "VOC_CLASSES",
    "HummingbirdEval",
    "LabelledItem",
    "LabelledSet",
    "ModeResult",
    "RetrievalEvalConfig",
    "RetrievalReport",
    "SegmentRetrievalEval",
    "confusion_matrix",
    "evaluate_retrieval",
    "iou_from_confusion",
    "open_labelled_set",
    "parse_modes",
    "plot_per_class",
    "rich_table",
    "write_report",
]

MODES = ("segments", "hummingbird")
VOID_MODES = ("ignore", "background")
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

Extractor = Callable[[np.ndarray], np.ndarray]
"""(H, W, 3) uint8 RGB -> (D, h, w) float32 features, unit L2 norm over D; the grid covers the whole
image (as :class:`densekit.serve.extractor.FeatureExtractor` gives: the frame is stretched, not cropped)."""


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """Settings of both protocols (defaults: the papers' / open-hummingbird's values where they exist).

    Attributes:
        segments: K of the per-image K-means (Zhang & Maire: 15).
        spatial_weight: the segment index's optional (y, x) term in K-means (0 = off, the paper's setting).
        k: Hummingbird neighbours (30). temperature: Hummingbird softmax temperature (0.02).
        memory_size: cap on Hummingbird memory entries (open-hummingbird's middle setting 1024 x 10^3; the
            original paper used 10,240,000).
        void_in_memory: ``"ignore"`` (void pixels left out of patch histograms) or ``"background"``
            (void counted as class 0, as open-hummingbird does).
        max_side: images whose longer side exceeds this are resized down (aspect kept) before extraction.
        frame_step: take every n-th annotated frame of a video set (1 = all; VOC: every n-th image).
        seed: K-means and memory-sampling seed. ignore_index: the void label (255).
        query_chunk: val patches searched per FAISS call (bounds the (n, k) result arrays).
    """

    segments: int = 15
    spatial_weight: float = 0.0
    k: int = 30
    temperature: float = 0.02
    memory_size: int = 1_024_000
    void_in_memory: str = "ignore"
    max_side: int = 512
    frame_step: int = 1
    seed: int = 0
    ignore_index: int = 255
    query_chunk: int = 16384

    def check(self) -> None:
        """DensekitError (one line) for a setting out of range."""
        if self.segments < 1:
            raise DensekitError(f"segments must be >= 1, got {self.segments}")
        if self.k < 1:
            raise DensekitError(f"k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise DensekitError(f"temperature must be > 0, got {self.temperature}")
        if self.memory_size < 1:
            raise DensekitError(f"memory size must be >= 1, got {self.memory_size}")
        if self.void_in_memory not in VOID_MODES:
            raise DensekitError(f"void_in_memory must be one of {', '.join(VOID_MODES)}, got {self.void_in_memory!r}")
        if self.max_side < 16:
            raise DensekitError(f"max_side must be >= 16, got {self.max_side}")
        if self.frame_step < 1:
            raise DensekitError(f"frame_step must be >= 1, got {self.frame_step}")
        if self.spatial_weight < 0:
            raise DensekitError(f"spatial_weight must be >= 0, got {self.spatial_weight}")


# ----------------------------------------------------------------------------------------------- scoring
def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) ground truth and prediction -> (C, C) int64 counts, rows = ground truth, columns = prediction.

    Pixels with ground truth ``ignore_index`` are skipped. Predictions must lie in [0, C).
    """
    gt = np.asarray(gt).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.size} vs {pred.size}")
    keep = gt != ignore_index
    g, p = gt[keep], pred[keep]
    if g.size and (g.min() < 0 or g.max() >= n_classes or p.min() < 0 or p.max() >= n_classes):
        raise ValueError(f"labels outside [0, {n_classes})")
    return np.bincount(g * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(C, C) confusion (rows = gt) -> (iou (C,) with 0 where TP+FP+FN = 0, present (C,) bool, mIoU).

    IoU_c = TP / (TP + FP + FN); mIoU = mean over classes present in the ground truth (TP + FN > 0);
    nan when no class is present.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    fn = conf.sum(axis=1) - tp
    fp = conf.sum(axis=0) - tp
    union = tp + fp + fn
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    present = (tp + fn) > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return iou, present, miou


# ------------------------------------------------------------------------------------ grid <-> pixel maps
def _cell_of(size: int, cells: int) -> np.ndarray:
    """Pixel i of ``size`` -> the feature cell covering it, floor(i * cells / size) (stretch, no crop)."""
    return (np.arange(size, dtype=np.int64) * cells) // size


def _upsample_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) cell values -> (height, width): every pixel takes the value of the cell covering it."""
    h, w = grid.shape
    return grid[_cell_of(height, h)][:, _cell_of(width, w)]


def _valid_labels(gt: np.ndarray, n_classes: int, ignore_index: int, void_in_memory: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (labels (H, W) int64, valid (H, W) bool) with void either excluded or mapped to class 0."""
    g = gt.astype(np.int64)
    void = g == ignore_index
    if void_in_memory == "background":
        return np.where(void, 0, g), np.ones_like(void)
    return g, ~void


def cell_histograms(
    gt: np.ndarray, h: int, w: int, n_classes: int, ignore_index: int = 255, void_in_memory: str = "ignore"
) -> tuple[np.ndarray, np.ndarray]:
    """Class histogram of the pixels under each feature cell.

    Args:
        gt: (H, W) class ids (``ignore_index`` = void). h, w: the feature grid.

    Returns:
        (hist (h*w, C) float32, rows sum to 1 for valid cells; valid (h*w,) bool: cells with a
        non-void pixel).
    """
    height, width = gt.shape
    labels, valid = _valid_labels(gt, n_classes, ignore_index, void_in_memory)
    cell = _cell_of(height, h)[:, None] * w + _cell_of(width, w)[None, :]
    counts = np.bincount(
        cell[valid] * n_classes + labels[valid], minlength=h * w * n_classes
    ).reshape(h * w, n_classes).astype(np.float32)
    total = counts.sum(axis=1)
    ok = total > 0
    counts[ok] /= total[ok, None]
    return counts, ok


def _check_gt(gt: np.ndarray, n_classes: int, ignore_index: int, what: str) -> None:
    bad = (gt >= n_classes) & (gt != ignore_index)
    if bad.any():
        raise DensekitError(
            f"{what}: class id {int(gt[bad].max())} but the class list has {n_classes} classes (0..{n_classes - 1}, "
            f"{ignore_index} = void)"
        )


def _flat_ip(x: np.ndarray) -> Any:
    import faiss  # lazily: see segment_index's note on OpenMP import order

    index = faiss.IndexFlatIP(int(x.shape[1]))
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


# ------------------------------------------------------------------------------------------ accumulators
@dataclass
class ModeResult:
    """The score of one protocol. ``confusion`` (C, C) rows = ground truth; ``iou``/``present`` (C,)."""

    mode: str
    confusion: np.ndarray
    iou: np.ndarray
    present: np.ndarray
    miou: float
    pixel_accuracy: float
    memory_entries: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_confusion(cls, mode: str, conf: np.ndarray, memory_entries: int, seconds: float, **extra: Any) -> ModeResult:
        iou, present, miou = iou_from_confusion(conf)
        total = conf.sum()
        acc = float(np.trace(conf) / total) if total else float("nan")
        return cls(mode, conf, iou, present, miou, acc, memory_entries, seconds, dict(extra))


class _ModeEval:
    """What both protocols share: the confusion matrix over val images and the time spent predicting."""

    def __init__(self, n_classes: int, config: RetrievalEvalConfig | None) -> None:
        self.n_classes = int(n_classes)
        self.cfg = config or RetrievalEvalConfig()
        self.conf = np.zeros((self.n_classes, self.n_classes), np.int64)
        self.seconds = 0.0

    def predict(self, feats: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def add_val(self, feats: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """Predict a val image, accumulate its confusion matrix; returns the (H, W) prediction."""
        pred = self.predict(feats, gt.shape)
        self.conf += confusion_matrix(gt, pred, self.n_classes, self.cfg.ignore_index)
        return pred


class SegmentRetrievalEval(_ModeEval):
    """Protocol (a): call :meth:`add_train` for every train image, then :meth:`add_val` for every val image.

    ``feats`` are (D, h, w) unit-norm features, ``gt`` (H, W) class ids of the same image.
    """

    mode = "segments"

    def __init__(self, n_classes: int, config: RetrievalEvalConfig | None = None) -> None:
        super().__init__(n_classes, config)
        self._desc: list[np.ndarray] = []
        self._cls: list[int] = []
        self._index: Any = None
        self._labels: np.ndarray | None = None
        self._dropped = 0

    def _segments(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (labels (h, w), descriptors (K', D))."""
        from densekit.retrieval.segment_index import kmeans_segments, region_descriptor

        labels = kmeans_segments(feats, k=self.cfg.segments, spatial_weight=self.cfg.spatial_weight, seed=self.cfg.seed)
        n = int(labels.max()) + 1
        desc = np.stack([region_descriptor(feats, labels == s) for s in range(n)])
        return labels, desc

    def add_train(self, feats: np.ndarray, gt: np.ndarray) -> int:
        """Segment a train image and store its labelled segments; returns how many were stored."""
        t0 = time.perf_counter()
        labels, desc = self._segments(feats)
        height, width = gt.shape
        pix = _upsample_nearest(labels, height, width)
        g, valid = _valid_labels(gt, self.n_classes, self.cfg.ignore_index, "ignore")
        n = desc.shape[0]
        votes = np.bincount(pix[valid] * self.n_classes + g[valid], minlength=n * self.n_classes).reshape(n, self.n_classes)
        keep = votes.sum(axis=1) > 0  # an all-void segment has no majority class
        self._desc.append(desc[keep])
        self._cls.extend(int(c) for c in votes[keep].argmax(axis=1))  # ties: the lowest class id
        self._dropped += int((~keep).sum())
        self.seconds += time.perf_counter() - t0
        return int(keep.sum())

    def _build(self) -> None:
        if not self._cls:
            raise DensekitError("segment retrieval: no train segment has a labelled (non-void) pixel")
        self._index = _flat_ip(np.concatenate(self._desc))
        self._labels = np.asarray(self._cls, dtype=np.int64)
        self._desc = []

    def predict(self, feats: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(D, h, w) features of a val image -> (H, W) predicted class map."""
        t0 = time.perf_counter()
        if self._index is None:
            self._build()
        labels, desc = self._segments(feats)
        _, nn = self._index.search(np.ascontiguousarray(desc), 1)
        assert self._labels is not None
        cls = self._labels[nn[:, 0]]
        pred = _upsample_nearest(cls[labels], size[0], size[1])
        self.seconds += time.perf_counter() - t0
        return pred

    def result(self) -> ModeResult:
        n = len(self._labels) if self._labels is not None else len(self._cls)
        return ModeResult.from_confusion(
            self.mode, self.conf, n, self.seconds, k_means_k=self.cfg.segments, void_only_segments_dropped=self._dropped
        )


class HummingbirdEval(_ModeEval):
    """Protocol (b): :meth:`add_train` for every train image (``n_train_images`` of them, for the per-image
    memory quota), then :meth:`add_val` for every val image."""

    mode = "hummingbird"

    def __init__(self, n_classes: int, n_train_images: int, config: RetrievalEvalConfig | None = None) -> None:
        super().__init__(n_classes, config)
        self.quota = max(1, self.cfg.memory_size // max(1, int(n_train_images)))
        self._feats: list[np.ndarray] = []
        self._hists: list[np.ndarray] = []
        self._seen = 0
        self._index: Any = None
        self._bank_hist: np.ndarray | None = None
        self.patches_seen = 0

    def add_train(self, feats: np.ndarray, gt: np.ndarray) -> int:
        """Add a train image's labelled patches (at most the per-image quota); returns how many."""
        t0 = time.perf_counter()
        d, h, w = feats.shape
        hist, valid = cell_histograms(gt, h, w, self.n_classes, self.cfg.ignore_index, self.cfg.void_in_memory)
        rows = np.flatnonzero(valid)
        self.patches_seen += rows.size
        if rows.size > self.quota:
            rng = np.random.default_rng([self.cfg.seed, self._seen])
            rows = np.sort(rng.choice(rows, self.quota, replace=False))
        self._seen += 1
        self._feats.append(np.ascontiguousarray(feats.reshape(d, h * w)[:, rows].T, dtype=np.float32))
        self._hists.append(hist[rows])
        self.seconds += time.perf_counter() - t0
        return int(rows.size)

    def _build(self) -> None:
        if not self._feats or not sum(len(f) for f in self._feats):
            raise DensekitError("hummingbird: the memory bank is empty (no train patch with a labelled pixel)")
        self._index = _flat_ip(np.concatenate(self._feats))
        self._bank_hist = np.concatenate(self._hists)
        self._feats, self._hists = [], []

    def predict_soft(self, feats: np.ndarray) -> np.ndarray:
        """(D, h, w) val features -> (h, w, C) float32 soft labels (softmax-weighted neighbour histograms)."""
        if self._index is None:
            self._build()
        assert self._bank_hist is not None
        d, h, w = feats.shape
        q = np.ascontiguousarray(feats.reshape(d, h * w).T, dtype=np.float32)
        k = min(self.cfg.k, int(self._index.ntotal))
        out = np.empty((h * w, self.n_classes), np.float32)
        for s in range(0, q.shape[0], self.cfg.query_chunk):
            sims, nn = self._index.search(q[s : s + self.cfg.query_chunk], k)
            logits = sims / self.cfg.temperature
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            out[s : s + len(sims)] = np.einsum("nk,nkc->nc", weights, self._bank_hist[nn])
        return out.reshape(h, w, self.n_classes)

    def predict(self, feats: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(D, h, w) val features -> (H, W) class map: soft labels upsampled bilinearly, then argmax."""
        import cv2

        t0 = time.perf_counter()
        soft = self.predict_soft(feats)
        height, width = size
        # cv2.resize handles up to 512 channels; more classes are resized in groups
        up = np.concatenate(
            [_resize_linear(soft[:, :, c : c + 512], width, height, cv2) for c in range(0, soft.shape[2], 512)], axis=2
        )
        pred = up.argmax(axis=2)
        self.seconds += time.perf_counter() - t0
        return pred

    def result(self) -> ModeResult:
        n = int(self._index.ntotal) if self._index is not None else sum(len(f) for f in self._feats)
        return ModeResult.from_confusion(
            self.mode, self.conf, n, self.seconds, k=self.cfg.k, temperature=self.cfg.temperature,
            memory_size=self.cfg.memory_size, per_image_quota=self.quota, train_patches_seen=self.patches_seen,
            void_in_memory=self.cfg.void_in_memory,
        )


def _resize_linear(x: np.ndarray, width: int, height: int, cv2: Any) -> np.ndarray:
    y = cv2.resize(np.ascontiguousarray(x), (width, height), interpolation=cv2.INTER_LINEAR)
    return y[:, :, None] if y.ndim == 2 else y


# ------------------------------------------------------------------------------------------------ datasets
@dataclass(frozen=True)
class LabelledItem:
    """One labelled image: a display name, the image file and its class-id mask (palette PNG)."""

    name: str
    image: Path
    mask: Path


@dataclass
class LabelledSet:
    """A labelled dataset split into train (memory) and val (queries)."""

    root: Path
    layout: str  # "davis-semantic" | "voc"
    classes: list[str]
    train: list[LabelledItem]
    val: list[LabelledItem]
    note: str = ""


def _read_class_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DensekitError(f"{path} lists no class")
    return names


def _images_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            out.setdefault(p.stem, p)
    return out


def _davis_semantic_set(root: Path, split_train: str, split_val: str, frame_step: int) -> LabelledSet:
    from densekit.serve.davis import DavisRoot

    sem = root / "SemanticAnnotations"
    resolutions = sorted(p.name for p in sem.iterdir() if p.is_dir())
    if not resolutions:
        raise DensekitError(f"{sem} holds no resolution folder (e.g. 480p)")
    res = "480p" if "480p" in resolutions else resolutions[0]
    davis = DavisRoot(root, resolution=res)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DensekitError(f"{root}: SemanticAnnotations without classes.txt (one class name a line, background first)")
    classes = _read_class_names(classes_file)

    def items(split: str) -> list[LabelledItem]:
        out: list[LabelledItem] = []
        for seq in davis.sequences(split):
            frames = {p.stem: p for p in davis.frame_paths(seq)}
            mask_dir = sem / res / seq
            masks = sorted(mask_dir.glob("*.png")) if mask_dir.is_dir() else []
            if not masks:
                raise DensekitError(f"sequence {seq!r} has no semantic masks in {mask_dir}")
            for m in masks[::frame_step]:
                if m.stem not in frames:
                    raise DensekitError(f"{m}: no frame {m.stem} in JPEGImages/{res}/{seq}")
                out.append(LabelledItem(f"{seq}/{m.stem}", frames[m.stem], m))
        return out

    return LabelledSet(root, "davis-semantic", classes, items(split_train), items(split_val))


def _voc_set(root: Path, split_train: str, split_val: str, frame_step: int) -> LabelledSet:
    images = _images_by_stem(root / "JPEGImages")
    masks = {s: p for s, p in _images_by_stem(root / "SegmentationClass").items() if p.suffix.lower() == ".png"}
    classes: list[str] = list(VOC_CLASSES)
    for name in ("classes.txt", "class_names.txt"):
        if (root / name).is_file():
            classes = _read_class_names(root / name)
            break

    def item(stem: str) -> LabelledItem:
        if stem not in images:
            raise DensekitError(f"{root}: image {stem!r} is listed but has no file in JPEGImages")
        if stem not in masks:
            raise DensekitError(f"{root}: image {stem!r} is listed but has no SegmentationClass/{stem}.png")
        return LabelledItem(stem, images[stem], masks[stem])

    sets = root / "ImageSets" / "Segmentation"
    note = ""
    if sets.is_dir():
        def listed(split: str) -> list[str]:
            path = sets / f"{split}.txt"
            if not path.is_file():
                avail = sorted(p.stem for p in sets.glob("*.txt"))
                raise DensekitError(f"no split {split!r} in {sets}; available: {', '.join(avail) or 'none'}")
            return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

        train_stems, val_stems = listed(split_train), listed(split_val)
    else:
        if (split_train, split_val) != ("train", "val"):
            raise DensekitError(f"{root} has no ImageSets/Segmentation folder, so no split {split_train!r}/{split_val!r}")
        stems = sorted(s for s in masks if s in images)
        train_stems = [s for i, s in enumerate(stems) if i % 3 != 2]
        val_stems = [s for i, s in enumerate(stems) if i % 3 == 2]
        note = "no ImageSets/Segmentation: deterministic split, every third image (sorted by name) is val"
    train = [item(s) for s in train_stems[::frame_step]]
    val = [item(s) for s in val_stems[::frame_step]]
    return LabelledSet(root, "voc", classes, train, val, note)


def open_labelled_set(
    root: str | os.PathLike[str], split_train: str = "train", split_val: str = "val", frame_step: int = 1
) -> LabelledSet:
    """Detect the layout of ``root`` and list its train and val images (see the module docstring).

    Raises:
        DensekitError: not a folder, an unknown layout, a missing split, class list, image or mask, or an
            empty split.
    """
    root = Path(root)
    if not root.is_dir():
        raise DensekitError(f"dataset folder not found: {root}")
    if (root / "SemanticAnnotations").is_dir() and (root / "JPEGImages").is_dir():
        data = _davis_semantic_set(root, split_train, split_val, frame_step)
    elif (root / "SegmentationClass").is_dir() and (root / "JPEGImages").is_dir():
        data = _voc_set(root, split_train, split_val, frame_step)
    else:
        raise DensekitError(
            f"{root} is not a labelled set: expected JPEGImages/ with SemanticAnnotations/ (densekit data sample) "
            "or SegmentationClass/ (PASCAL VOC layout)"
        )
    for split, items in ((split_train, data.train), (split_val, data.val)):
        if not items:
            raise DensekitError(f"{root}: split {split!r} has no labelled image")
    return data


# ------------------------------------------------------------------------------------------------- driver
@dataclass
class RetrievalReport:
    """Everything one evaluation run measured (see :meth:`to_json`)."""

    dataset: dict[str, Any]
    backbone: dict[str, Any]
    config: dict[str, Any]
    classes: list[str]
    modes: dict[str, ModeResult]
    seconds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        modes = {}
        for name, r in self.modes.items():
            modes[name] = {
                "mIoU": r.miou,
                "pixel_accuracy": r.pixel_accuracy,
                "classes_present": int(r.present.sum()),
                "memory_entries": r.memory_entries,
                "seconds": round(r.seconds, 3),
                **r.extra,
                "per_class_iou": {c: float(v) for c, v, p in zip(self.classes, r.iou, r.present, strict=True) if p},
            }
        return {
            "dataset": self.dataset,
            "backbone": self.backbone,
            "config": self.config,
            "classes": self.classes,
            "modes": modes,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "protocol": "densekit.retrieval.retrieval_eval (see its docstring for deviations from the papers)",
        }


def _resize_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return image
    import cv2

    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _load(item: LabelledItem, n_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    from densekit.serve.imageio import read_image, read_mask

    image = read_image(item.image)
    gt = read_mask(item.mask)
    if gt.shape != image.shape[:2]:
        raise DensekitError(
            f"{item.mask}: mask is {gt.shape[1]}x{gt.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}"
        )
    _check_gt(gt, n_classes, ignore_index, str(item.mask))
    return image, gt


def evaluate_retrieval(
    root: str | os.PathLike[str] | LabelledSet,
    extractor: Extractor,
    modes: Sequence[str] = MODES,
    config: RetrievalEvalConfig | None = None,
    *,
    split_train: str = "train",
    split_val: str = "val",
    progress: Callable[[str, int, int], None] | None = None,
    backbone_name: str | None = None,
) -> RetrievalReport:
    """Run the chosen protocols on a labelled set with one feature extraction per image.

    Args:
        root: a dataset folder (layout detected by :func:`open_labelled_set`) or a ready :class:`LabelledSet`.
        extractor: (H, W, 3) uint8 -> (D, h, w) unit-norm features, e.g. a
            :class:`~densekit.serve.extractor.FeatureExtractor` (its ``.meta`` goes into the report).
        modes: any of ``"segments"``, ``"hummingbird"``.
        progress: called as ``progress(stage, done, total)`` with stage ``"train"`` or ``"val"`` after each image.

    Returns:
        A :class:`RetrievalReport`; ``report.modes[m].miou`` is the headline number.
    """
    cfg = config or RetrievalEvalConfig()
    cfg.check()
    modes = list(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise DensekitError(f"unknown mode {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    data = root if isinstance(root, LabelledSet) else open_labelled_set(root, split_train, split_val, cfg.frame_step)
    n_classes = len(data.classes)
    evals: list[SegmentRetrievalEval | HummingbirdEval] = []
    for m in modes:
        if m == "segments":
            evals.append(SegmentRetrievalEval(n_classes, cfg))
        else:
            evals.append(HummingbirdEval(n_classes, len(data.train), cfg))
    t_start = time.perf_counter()
    extract_s = 0.0
    pixels = {"train": np.zeros(n_classes, np.int64), "val": np.zeros(n_classes, np.int64)}
    for stage, items in (("train", data.train), ("val", data.val)):
        for i, item in enumerate(items):
            image, gt = _load(item, n_classes, cfg.ignore_index)
            pixels[stage] += np.bincount(gt[gt != cfg.ignore_index].ravel(), minlength=n_classes)[:n_classes]
            t0 = time.perf_counter()
            feats = np.asarray(extractor(_resize_max_side(image, cfg.max_side)), dtype=np.float32)
            extract_s += time.perf_counter() - t0
            if feats.ndim != 3:
                raise DensekitError(f"the extractor returned an array of shape {feats.shape}, not (D, h, w)")
            for ev in evals:
                if stage == "train":
                    ev.add_train(feats, gt)
                else:
                    ev.add_val(feats, gt)
            if progress is not None:
                progress(stage, i + 1, len(items))
    meta = getattr(extractor, "meta", None)
    backbone: dict[str, Any] = {"name": backbone_name or (meta.name if meta is not None else type(extractor).__name__)}
    if meta is not None:
        backbone.update(stride=int(meta.stride), dim=int(meta.dim), arch=getattr(meta, "arch", None))
    overlap = len({i.name for i in data.train} & {i.name for i in data.val})
    return RetrievalReport(
        dataset={
            "root": str(data.root), "layout": data.layout, "split_train": split_train, "split_val": split_val,
            "train_images": len(data.train), "val_images": len(data.val), "train_val_overlap": overlap,
            "note": data.note,
            # a val class never seen in train cannot be retrieved by either protocol
            "val_classes_not_in_train": [
                data.classes[c] for c in np.flatnonzero((pixels["val"] > 0) & (pixels["train"] == 0))
            ],
        },
        backbone=backbone,
        config=asdict(cfg),
        classes=list(data.classes),
        modes={ev.mode: ev.result() for ev in evals},
        seconds={"total": time.perf_counter() - t_start, "feature_extraction": extract_s},
    )


# ------------------------------------------------------------------------------------------------ outputs
CSV_COLUMNS = ("mode", "class_id", "class", "iou", "tp", "fp", "fn", "gt_pixels", "present")


def per_class_csv(report: RetrievalReport) -> str:
    """The per-class table as CSV text (one row per mode and class; ``present`` = in the val ground truth)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for mode, r in report.modes.items():
        conf = r.confusion
        tp = np.diag(conf)
        for c, name in enumerate(report.classes):
            fn = int(conf[c].sum() - tp[c])
            fp = int(conf[:, c].sum() - tp[c])
            writer.writerow([mode, c, name, f"{r.iou[c]:.6f}", int(tp[c]), fp, fn, int(conf[c].sum()), int(r.present[c])])
    return buf.getvalue()


def plot_per_class(report: RetrievalReport, png_path: str | os.PathLike[str]) -> Path:
    """Bar chart of per-class IoU (classes present in the val ground truth), one bar group per mode, with
    each mode's mIoU as a dashed line; written atomically (matplotlib Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = list(report.modes.values())
    present = np.zeros(len(report.classes), bool)
    for r in modes:
        present |= r.present
    idx = np.flatnonzero(present)
    x = np.arange(len(idx))
    width = 0.8 / max(1, len(modes))
    fig = Figure(figsize=(max(6.0, 0.5 * len(idx) + 2.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = ("#4C72B0", "#DD8452", "#55A868")
    for j, r in enumerate(modes):
        colour = colours[j % len(colours)]
        offset = (j - (len(modes) - 1) / 2) * width
        ax.bar(x + offset, r.iou[idx], width=width, color=colour, label=f"{r.mode} (mIoU {r.miou:.3f})")
        ax.axhline(r.miou, color=colour, linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels([report.classes[i] for i in idx], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU")
    ax.set_title(f"{report.backbone['name']} on {Path(report.dataset['root']).name}: per-class IoU (val)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    dest = Path(png_path)
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return dest


def write_report(report: RetrievalReport, out_dir: str | os.PathLike[str], plot: bool = True) -> list[Path]:
    """Write ``metrics.json``, ``per_class.csv`` and (``plot``) ``per_class_iou.png`` into ``out_dir``,
    each atomically. Returns the paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DensekitError(f"--out {out} exists and is not a folder")
    paths = [out / "metrics.json", out / "per_class.csv"]
    write_text_atomic(paths[0], json.dumps(report.to_json(), indent=2, default=_json_default) + "\n")
    write_text_atomic(paths[1], per_class_csv(report))
    if plot:
        paths.append(plot_per_class(report, out / "per_class_iou.png"))
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def rich_table(report: RetrievalReport, per_class: bool = True) -> list[Any]:
    """The summary (one row per mode) and, optionally, per-class IoU as ``rich.table.Table`` objects."""
    from rich.table import Table

    ds = report.dataset
    summary = Table(
        title=f"{report.backbone['name']} on {ds['root']} "
        f"({ds['layout']}; train {ds['train_images']}, val {ds['val_images']} images)"
    )
    for c in ("mode", "mIoU", "pixel acc", "classes", "memory", "seconds"):
        summary.add_column(c, justify="left" if c == "mode" else "right")
    for r in report.modes.values():
        summary.add_row(
            r.mode, f"{r.miou:.4f}", f"{r.pixel_accuracy:.4f}", str(int(r.present.sum())), str(r.memory_entries),
            f"{r.seconds:.1f}",
        )
    tables: list[Any] = [summary]
    if per_class:
        t = Table(title="Per-class IoU (classes present in val)")
        t.add_column("class")
        for m in report.modes:
            t.add_column(m, justify="right")
        present = np.zeros(len(report.classes), bool)
        for r in report.modes.values():
            present |= r.present
        for c in np.flatnonzero(present):
            t.add_row(report.classes[c], *[f"{r.iou[c]:.4f}" if r.present[c] else "-" for r in report.modes.values()])
        tables.append(t)
    return tables


def parse_modes(text: str) -> list[str]:
    """``"both"`` -> both modes; ``"segments"``/``"hummingbird"`` -> that one (DensekitError otherwise)."""
    if text == "both":
        return list(MODES)
    if text in MODES:
        return [text]
    raise DensekitError(f"unknown --mode {text!r}; choose segments, hummingbird or both")
