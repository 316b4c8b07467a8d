"""The embedded default dataset: short DAVIS-2017-style videos made from real photographs.

Nothing is downloaded: every texture and background is a photograph that ships inside the
scikit-image wheel (``skimage.data``: astronaut, chelsea the cat, coffee, rocket, coins, cameraman,
the stereo motorcycle; grass, gravel, brick, moon and the Hubble deep field as backgrounds).

Each video has 1 to 4 objects. An object is a shape (ellipse, rounded rectangle, star, polygon, or a
blob from a smoothed random radius function) filled with a crop of one photograph; its class is that
photograph (``cat``, ``astronaut``...), so class ids can be used to evaluate segment retrieval. Objects
move, scale and rotate, occlude each other by a fixed depth order, and leave and re-enter the frame;
the background is another photograph seen through a panning, zooming crop window (a moving camera).

Instance masks are exact: an object's id covers exactly the pixels where it was drawn on top, after
occlusion, because images and masks come from the same hard (not anti-aliased) composite. An object
outside the frame (or fully hidden) has no pixel, so its id does not appear in that frame. All objects
are visible in the first frame, as DAVIS-2017 semi-supervised evaluation expects, with ids 1..n.

Layout written by :func:`make_sample` (DAVIS-2017, Pont-Tuset et al. 2017, plus semantic masks)::

    out/JPEGImages/480p/<seq>/00000.jpg            quality 95
    out/Annotations/480p/<seq>/00000.png           palette PNG, object ids 1..n, 0 background
    out/SemanticAnnotations/480p/<seq>/00000.png   palette PNG, class ids (index into classes.txt)
    out/ImageSets/2017/train.txt, val.txt          sequence names
    out/classes.txt                                one class a line, background first
    out/sample.json                                seed, parameters, and what each video contains

Everything is deterministic given the seed (sequence ``i`` depends only on ``(seed, i)``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import write_mask

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "ObjectPlan",
    "RenderedFrame",
    "SequencePlan",
    "make_sample",
    "plan_sample",
    "render_sequence",
]

GENERATOR = "densekit.serve.sample"
FORMAT_VERSION = 1
_PATCH = 128  # side of an object's local texture/shape patch, in pixels
_SHAPE_R = 0.9 * _PATCH / 2  # shapes fit inside this radius, so rotation never clips them

# Object classes: the photograph that textures the object, and the region (row0, row1, col0, col1 as
# fractions of the image) that shows the subject, so crops of one class look alike.
_OBJECT_SOURCES: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "astronaut": ("astronaut", (0.05, 0.95, 0.08, 0.68)),
    "cat": ("chelsea", (0.0, 1.0, 0.12, 0.88)),
    "coffee": ("coffee", (0.0, 0.95, 0.12, 0.8)),
    "rocket": ("rocket", (0.3, 1.0, 0.38, 0.62)),
    "coins": ("coins", (0.0, 0.9, 0.0, 1.0)),
    "cameraman": ("camera", (0.1, 0.8, 0.05, 0.65)),
    "motorcycle": ("motorcycle", (0.3, 0.9, 0.15, 0.95)),
}
CLASSES: tuple[str, ...] = ("background", *_OBJECT_SOURCES)
BACKGROUNDS: tuple[str, ...] = ("grass", "gravel", "brick", "moon", "hubble_deep_field")
SHAPES: tuple[str, ...] = ("ellipse", "rounded_rect", "star", "polygon", "blob")
_SAMPLE_ENTRIES = ("JPEGImages", "Annotations", "SemanticAnnotations", "ImageSets", "classes.txt", "sample.json")


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as (H, W, 3) uint8 RGB (only wheel-bundled images: no pooch)."""
    from skimage import data

    if name == "motorcycle":
        img = data.stereo_motorcycle()[0]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)
    img.setflags(write=False)
    return img


# ----------------------------------------------------------------------------------------------------
# Planning: every random choice, made up front from the seed
# ----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ObjectPlan:
    """One object of a video.

    Attributes:
        obj_id: instance id (1..n), in the first-frame annotation order.
        cls: class name (an entry of :data:`CLASSES`).
        shape: one of :data:`SHAPES`.
        depth: compositing order, 0 = farthest; a nearer object hides a farther one.
        motion: ``'meet'`` (crosses another object's path), ``'linear'``, ``'out_and_back'``, ``'curve'``.
        texture: ``(P, P, 3)`` uint8 texture patch.
        local_mask: ``(P, P)`` float32 0/1 shape in the patch.
        pos: ``(T, 2)`` float64 centre (x, y) in pixels per frame.
        scale: ``(T,)`` pixels per patch pixel.
        angle: ``(T,)`` rotation in degrees (counter-clockwise).
    """

    obj_id: int
    cls: str
    shape: str
    depth: int
    motion: str
    texture: np.ndarray
    local_mask: np.ndarray
    pos: np.ndarray
    scale: np.ndarray
    angle: np.ndarray

    def affine(self, t: int) -> np.ndarray:
        """``(2, 3)`` map from patch pixels to frame pixels at frame ``t``."""
        import cv2

        c = (_PATCH / 2.0, _PATCH / 2.0)
        m = cv2.getRotationMatrix2D(c, float(self.angle[t]), float(self.scale[t]))
        m[:, 2] += self.pos[t] - np.asarray(c)
        return m


@dataclass(eq=False)
class SequencePlan:
    """One video: its name, background camera path and objects (ids 1..n)."""

    name: str
    frames: int
    height: int
    width: int
    background: str
    bg_gain: np.ndarray  # (3,) colour gains applied to the background photo
    bg_center: np.ndarray  # (T, 2) crop-window centre in photo pixels
    bg_scale: np.ndarray  # (T,) output pixels per photo pixel
    objects: list[ObjectPlan] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)


def _shape_mask(shape: str, rng: np.random.Generator) -> np.ndarray:
    """A filled shape centred in a ``(P, P)`` patch, within radius ``_SHAPE_R``, as float32 0/1."""
    import cv2

    c = _PATCH / 2.0
    r = _SHAPE_R
    shift = 4  # sub-pixel vertex precision for cv2 drawing
    mask = np.zeros((_PATCH, _PATCH), np.uint8)

    def poly(radii: np.ndarray, thetas: np.ndarray) -> None:
        pts = np.stack([c + radii * np.cos(thetas), c + radii * np.sin(thetas)], axis=1)
        cv2.fillPoly(mask, [np.round(pts * (1 << shift)).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)

    if shape == "ellipse":
        b = r * rng.uniform(0.5, 0.95)
        cv2.ellipse(mask, ((c, c), (2 * r, 2 * b), 0.0), 1, thickness=-1, lineType=cv2.LINE_8)
    elif shape == "rounded_rect":
        a = r * 0.72  # half width; corners stay inside r for b <= 0.69 r
        b = r * rng.uniform(0.4, 0.69)
        rc = rng.uniform(0.15, 0.45) * b
        x0, x1, y0, y1 = c - a, c + a, c - b, c + b
        cv2.rectangle(mask, (round(x0 + rc), round(y0)), (round(x1 - rc), round(y1)), 1, thickness=-1)
        cv2.rectangle(mask, (round(x0), round(y0 + rc)), (round(x1), round(y1 - rc)), 1, thickness=-1)
        for cx, cy in ((x0 + rc, y0 + rc), (x1 - rc, y0 + rc), (x0 + rc, y1 - rc), (x1 - rc, y1 - rc)):
            cv2.circle(mask, (round(cx), round(cy)), round(rc), 1, thickness=-1)
    elif shape == "star":
        k = int(rng.integers(5, 8))
        inner = rng.uniform(0.42, 0.6)
        th = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False) + rng.uniform(0, 2 * np.pi)
        poly(np.where(np.arange(2 * k) % 2 == 0, r, r * inner), th)
    elif shape == "polygon":
        k = int(rng.integers(3, 9))
        th = np.sort(np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(-0.25, 0.25, k) * 2 * np.pi / k)
        poly(r * rng.uniform(0.8, 1.0, k), th + rng.uniform(0, 2 * np.pi))
    elif shape == "blob":
        # Smooth random radius function: a few low-frequency Fourier terms with decaying amplitude.
        th = np.linspace(0, 2 * np.pi, 180, endpoint=False)
        rad = np.ones_like(th)
        for k in range(2, 6):
            rad += rng.uniform(0.0, 0.3) / k * np.cos(k * th + rng.uniform(0, 2 * np.pi))
        poly(r * rad / rad.max(), th)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    return mask.astype(np.float32)


def _texture(cls: str, rng: np.random.Generator) -> np.ndarray:
    """A square crop of the class's photograph, inside its subject region, resized to ``(P, P, 3)``."""
    import cv2

    src_name, (r0, r1, c0, c1) = _OBJECT_SOURCES[cls]
    img = _photo(src_name)
    h, w = img.shape[:2]
    y0, y1, x0, x1 = int(r0 * h), int(r1 * h), int(c0 * w), int(c1 * w)
    side = int(min(y1 - y0, x1 - x0) * rng.uniform(0.55, 0.9))
    y = int(rng.integers(y0, y1 - side + 1))
    x = int(rng.integers(x0, x1 - side + 1))
    crop = img[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (_PATCH, _PATCH), interpolation=cv2.INTER_AREA)


def _exit_distance(p: np.ndarray, d: np.ndarray, w: int, h: int, margin: float) -> float:
    """Distance along unit direction ``d`` from ``p`` until the frame grown by ``margin`` is left."""
    ts = []
    for k, size in ((0, w), (1, h)):
        if d[k] > 1e-9:
            ts.append((size + margin - p[k]) / d[k])
        elif d[k] < -1e-9:
            ts.append((-margin - p[k]) / d[k])
    return float(min(ts))


def _plan_objects(rng: np.random.Generator, n: int, t: int, h: int, w: int) -> list[ObjectPlan]:
    tt = np.linspace(0.0, 1.0, t)
    short = min(h, w)
    classes = rng.choice(len(CLASSES) - 1, size=n, replace=False) + 1
    depth = rng.permutation(n)
    motions = [str(rng.choice(["linear", "out_and_back", "curve"], p=[0.35, 0.4, 0.25])) for _ in range(n)]
    meet = np.sort(rng.choice(n, size=2, replace=False)) if n >= 2 else np.array([], int)
    for j in meet:
        motions[int(j)] = "meet"
    # The pair that meets starts apart and reaches one point at the same time: their shapes overlap.
    tm = rng.uniform(0.3, 0.6)
    q = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
    objs = []
    for j in range(n):
        radius = rng.uniform(0.15, 0.26) * short  # object radius in pixels at scale 1
        s0 = radius / _SHAPE_R
        scale = s0 * np.exp(rng.uniform(-0.4, 0.4) * tt)
        angle = rng.uniform(0, 360) + rng.uniform(-120, 120) * tt
        p0 = np.array([rng.uniform(0.12, 0.88) * w, rng.uniform(0.18, 0.82) * h])
        extent = float(scale.max() * _SHAPE_R) + 2.0
        if motions[j] == "meet":
            if j == int(meet[1]):
                # Start on the other side of the meeting point from the first of the pair.
                other = objs[int(meet[0])].pos[0]
                p0 = np.clip(2 * q - other + rng.normal(0, 0.08 * short, 2), [0.1 * w, 0.15 * h], [0.9 * w, 0.85 * h])
            pos = p0 + (q - p0)[None, :] * (tt / tm)[:, None]
        elif motions[j] == "linear":
            a = rng.uniform(0, 2 * np.pi)
            pos = p0 + np.outer(tt, np.array([np.cos(a), np.sin(a)]) * rng.uniform(0.4, 1.1) * w)
        elif motions[j] == "out_and_back":
            a = rng.uniform(0, 2 * np.pi)
            d = np.array([np.cos(a), np.sin(a)])
            amp = _exit_distance(p0, d, w, h, extent) * rng.uniform(1.15, 1.45)
            pos = p0 + np.outer(np.sin(np.pi * tt), d * amp)
        else:  # curve
            a = rng.uniform(0, 2 * np.pi)
            d = np.array([np.cos(a), np.sin(a)])
            perp = np.array([-d[1], d[0]])
            wave = np.sin(2 * np.pi * tt * rng.uniform(0.5, 1.2) + rng.uniform(0, 2 * np.pi))
            pos = p0 + np.outer(tt, d * rng.uniform(0.25, 0.6) * w) + np.outer(wave - wave[0], perp * rng.uniform(0.08, 0.2) * h)
        shape = str(rng.choice(SHAPES))
        cls = CLASSES[int(classes[j])]
        objs.append(
            ObjectPlan(
                obj_id=j + 1,
                cls=cls,
                shape=shape,
                depth=int(depth[j]),
                motion=motions[j],
                texture=_texture(cls, rng),
                local_mask=_shape_mask(shape, rng),
                pos=pos,
                scale=scale,
                angle=angle,
            )
        )
    return objs


def _plan_background(rng: np.random.Generator, t: int, h: int, w: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    name = str(rng.choice(BACKGROUNDS))
    ph, pw = _photo(name).shape[:2]
    cover = max(w / pw, h / ph)  # smallest scale at which the window fits in the photo
    z = cover * rng.uniform(1.35, 1.9) * np.exp(np.linspace(0.0, rng.uniform(-0.25, 0.25), t))
    zmin = float(z.min())
    half = np.array([w / 2 / zmin, h / 2 / zmin])  # largest half-window over the clip
    lo, hi = half, np.array([pw, ph]) - half
    c0 = rng.uniform(lo, hi)
    c1 = rng.uniform(lo, hi)
    centers = c0 + np.outer(np.linspace(0.0, 1.0, t), c1 - c0)
    # Tint the grayscale photos (grass, gravel...) a little so backgrounds differ in colour too.
    photo = _photo(name)
    gain = rng.uniform(0.8, 1.2, 3) if np.array_equal(photo[:, :, 0], photo[:, :, 1]) else np.ones(3)
    return name, gain, centers, z


def _roi(obj: ObjectPlan, t: int, h: int, w: int) -> tuple[slice, slice, np.ndarray] | None:
    """The frame window that can hold the object at frame ``t`` and the patch->window affine map.

    Warping only into this window (instead of the whole frame) keeps rendering cheap; None when the
    object's patch lies entirely outside the frame.
    """
    m = obj.affine(t)
    corners = np.array([[0, 0, 1], [_PATCH, 0, 1], [0, _PATCH, 1], [_PATCH, _PATCH, 1]], float) @ m.T
    x0, y0 = np.floor(corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), w), min(int(y1), h)
    if x0 >= x1 or y0 >= y1:
        return None
    m = m.copy()
    m[:, 2] -= (x0, y0)
    return slice(y0, y1), slice(x0, x1), m


def _warp_mask(obj: ObjectPlan, t: int, h: int, w: int) -> np.ndarray:
    """The object's full (unoccluded, in-frame) shape at frame ``t`` as ``(H, W)`` bool."""
    import cv2

    out = np.zeros((h, w), bool)
    roi = _roi(obj, t, h, w)
    if roi is not None:
        ys, xs, m = roi
        size = (xs.stop - xs.start, ys.stop - ys.start)
        # Bilinear then threshold: smoother edges than nearest-neighbour at large scales.
        out[ys, xs] = cv2.warpAffine(obj.local_mask, m, size, flags=cv2.INTER_LINEAR, borderValue=0.0) >= 0.5
    return out


def _check(plan: SequencePlan, need_leave: bool) -> dict[str, object] | None:
    """Statistics of a candidate video, or None when it misses a requirement.

    Requirements: every object clearly visible in frame 0 (ids 1..n all present), every object's
    centre travels, a pair of objects overlaps (occlusion) when there are two or more, and, when
    ``need_leave``, some object is entirely out of the frame in some frame.
    """
    h, w, t = plan.height, plan.width, plan.frames
    n = len(plan.objects)
    order = sorted(plan.objects, key=lambda o: o.depth)
    min_vis0 = max(0.008 * h * w, 30.0)
    left = [False] * n
    max_overlap = 0
    for k in range(t):
        full = [_warp_mask(o, k, h, w) for o in plan.objects]
        if k == 0:
            inst = np.zeros((h, w), np.uint8)
            for o in order:
                inst[full[o.obj_id - 1]] = o.obj_id
            counts = np.bincount(inst.ravel(), minlength=n + 1)
            if (counts[1:] < min_vis0).any():
                return None
        for j in range(n):
            if not full[j].any():
                left[j] = True
        for a in range(n):
            for b in range(a + 1, n):
                max_overlap = max(max_overlap, int(np.count_nonzero(full[a] & full[b])))
    travel = [float(np.linalg.norm(o.pos - o.pos[0], axis=1).max()) for o in plan.objects]
    if min(travel) < 0.2 * min(h, w):
        return None
    if n >= 2 and max_overlap < 0.004 * h * w:
        return None
    if need_leave and not any(left):
        return None
    return {"max_overlap_px": max_overlap, "leaves_frame": left, "travel_px": [round(x, 1) for x in travel]}


def plan_sample(
    sequences: int = 6, frames: int = 24, height: int = 240, width: int = 432, seed: int = 0
) -> list[SequencePlan]:
    """Every random choice of a sample dataset, deterministic in ``seed``; sequence ``i`` uses ``(seed, i)``.

    Even-numbered videos always have an object that leaves the frame; videos with two or more objects
    always have an occlusion; the first video has at least two objects.
    """
    _check_args(sequences, frames, height, width, seed, 0.0)
    plans = []
    for i in range(sequences):
        rng = np.random.default_rng([seed, i])
        n = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
        if i == 0:
            n = max(n, 2)
        for _attempt in range(500):
            bg, gain, centers, zoom = _plan_background(rng, frames, height, width)
            objs = _plan_objects(rng, n, frames, height, width)
            plan = SequencePlan("", frames, height, width, bg, gain, centers, zoom, objs)
            stats = _check(plan, need_leave=(i % 2 == 0))
            if stats is not None:
                break
        else:  # pragma: no cover - the requirements are met within a few tries for sane sizes
            raise DensekitError(f"could not lay out sample video {i} at {width}x{height}; try a larger size")
        plan.stats = stats
        plan.name = f"{i:02d}-" + "-".join(o.cls for o in objs)
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RenderedFrame:
    """One rendered frame: ``image`` (H, W, 3) uint8 RGB, ``instance`` and ``semantic`` (H, W) uint8,
    ``amodal`` (n, H, W) bool full in-frame shape of each object before occlusion (row j = id j + 1)."""

    image: np.ndarray
    instance: np.ndarray
    semantic: np.ndarray
    amodal: np.ndarray


def render_sequence(plan: SequencePlan) -> Iterator[RenderedFrame]:
    """Render a planned video frame by frame (streaming)."""
    import cv2

    h, w = plan.height, plan.width
    photo = _photo(plan.background).astype(np.float32) * plan.bg_gain[None, None, :]
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    class_of = np.zeros(256, np.uint8)
    for o in plan.objects:
        class_of[o.obj_id] = CLASSES.index(o.cls)
    order = sorted(plan.objects, key=lambda o: o.depth)
    for k in range(plan.frames):
        s = float(plan.bg_scale[k])
        cx, cy = plan.bg_center[k]
        cam = np.array([[s, 0.0, w / 2 - s * cx], [0.0, s, h / 2 - s * cy]])
        image = cv2.warpAffine(photo, cam, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        instance = np.zeros((h, w), np.uint8)
        amodal = np.zeros((len(plan.objects), h, w), bool)
        for o in order:  # far to near: nearer objects paint over farther ones
            m = _warp_mask(o, k, h, w)
            amodal[o.obj_id - 1] = m
            if not m.any():
                continue
            ys, xs, aff = _roi(o, k, h, w)  # type: ignore[misc]  # not None: m has pixels
            win = m[ys, xs]
            tex = cv2.warpAffine(
                o.texture, aff, (xs.stop - xs.start, ys.stop - ys.start),
                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
            )
            image[ys, xs][win] = tex[win]
            instance[m] = o.obj_id
        yield RenderedFrame(image, instance, class_of[instance], amodal)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _check_args(sequences: int, frames: int, height: int, width: int, seed: int, val_fraction: float) -> None:
    if int(sequences) != sequences or sequences < 1:
        raise DensekitError(f"sequences must be a positive integer, got {sequences}")
    # Fewer than 4 frames or a very elongated frame leave no room for objects to meet and to leave.
    if int(frames) != frames or frames < 4:
        raise DensekitError(f"frames must be an integer >= 4, got {frames}")
    if int(height) != height or int(width) != width or min(height, width) < 64:
        raise DensekitError(f"height and width must be integers >= 64, got {height}x{width}")
    if max(height, width) > 4 * min(height, width):
        raise DensekitError(f"frame aspect ratio must be at most 4:1, got {width}x{height}")
    if int(seed) != seed or seed < 0:
        raise DensekitError(f"seed must be a non-negative integer, got {seed}")
    if not 0.0 <= float(val_fraction) <= 1.0 or math.isnan(float(val_fraction)):
        raise DensekitError(f"val_fraction must be in [0, 1], got {val_fraction}")


def _is_previous_sample(out: Path) -> bool:
    try:
        meta = json.loads((out / "sample.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR


def _prepare_out_dir(out: Path) -> None:
    """Refuse a non-empty folder unless it is a previous sample, which is then removed cleanly."""
    if out.exists() and not out.is_dir():
        raise DensekitError(f"{out} exists and is not a folder")
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = [p for p in out.iterdir()]
    if not entries:
        return
    if not _is_previous_sample(out):
        raise DensekitError(f"{out} is not empty and holds no previous densekit sample; choose an empty or new folder")
    # Leftover temp files of an interrupted atomic write look like '.sample.json.XXXX.json'.
    foreign = [p.name for p in entries if p.name not in _SAMPLE_ENTRIES and not p.name.startswith(tuple(f".{e}." for e in _SAMPLE_ENTRIES))]
    if foreign:
        raise DensekitError(f"{out} holds a previous sample plus other files ({foreign[0]}...); not overwriting it")
    for p in entries:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=95)


def make_sample(
    out_dir: str | os.PathLike[str],
    sequences: int = 6,
    frames: int = 24,
    height: int = 240,
    width: int = 432,
    seed: int = 0,
    val_fraction: float = 0.34,
) -> Path:
    """Write the sample dataset (layout in the module docstring) and return ``out_dir``.

    Args:
        out_dir: an empty or new folder, or a previous sample (which is deleted and rewritten; a folder
            with anything else in it is refused).
        sequences: number of videos.
        frames: frames per video.
        height, width: frame size in pixels.
        seed: all content is a deterministic function of it.
        val_fraction: share of videos listed in ``val.txt`` (at least one); the rest go to ``train.txt``.

    Returns:
        ``Path(out_dir)``. ``sample.json`` there describes what was made (seed, parameters, classes,
        splits, and per video its background and objects: id, class, shape, depth, motion).

    Raises:
        DensekitError: bad parameters or an output folder that is not empty and not a previous sample.
    """
    _check_args(sequences, frames, height, width, seed, val_fraction)
    out = Path(out_dir)
    _prepare_out_dir(out)
    params = {
        "seed": int(seed),
        "sequences": int(sequences),
        "frames": int(frames),
        "height": int(height),
        "width": int(width),
        "val_fraction": float(val_fraction),
    }
    meta: dict[str, object] = {"generator": GENERATOR, "format_version": FORMAT_VERSION, "complete": False, **params}
    # Written first so that an interrupted run can be overwritten by the next one.
    write_text_atomic(out / "sample.json", json.dumps(meta, indent=2) + "\n")

    plans = plan_sample(sequences, frames, height, width, seed)
    res = "480p"  # the DAVIS folder name, whatever the actual size
    videos = []
    for plan in plans:
        seq = plan.name
        present = np.zeros(len(plan.objects), int)
        for k, fr in enumerate(render_sequence(plan)):
            stem = f"{k:05d}"
            _write_jpeg(out / "JPEGImages" / res / seq / f"{stem}.jpg", fr.image)
            write_mask(out / "Annotations" / res / seq / f"{stem}.png", fr.instance)
            write_mask(out / "SemanticAnnotations" / res / seq / f"{stem}.png", fr.semantic)
            ids = np.unique(fr.instance)
            present[ids[ids > 0] - 1] += 1
        videos.append(
            {
                "name": seq,
                "background": plan.background,
                "objects": [
                    {
                        "id": o.obj_id,
                        "class": o.cls,
                        "class_id": CLASSES.index(o.cls),
                        "shape": o.shape,
                        "depth": o.depth,
                        "motion": o.motion,
                        "frames_visible": int(present[o.obj_id - 1]),
                        "leaves_frame": bool(plan.stats["leaves_frame"][o.obj_id - 1]),  # type: ignore[index]
                    }
                    for o in plan.objects
                ],
                "max_overlap_px": plan.stats["max_overlap_px"],
            }
        )

    names = [p.name for p in plans]
    n_val = min(len(names), max(1, round(val_fraction * len(names))))
    pick = np.random.default_rng([seed, 1_000_003]).permutation(len(names))[:n_val]
    val = [n for i, n in enumerate(names) if i in set(pick.tolist())]
    train = [n for n in names if n not in val]
    write_text_atomic(out / "ImageSets" / "2017" / "train.txt", "".join(f"{n}\n" for n in train))
    write_text_atomic(out / "ImageSets" / "2017" / "val.txt", "".join(f"{n}\n" for n in val))
    write_text_atomic(out / "classes.txt", "".join(f"{c}\n" for c in CLASSES))

    meta.update(
        complete=True,
        classes=list(CLASSES),
        splits={"train": train, "val": val},
        videos=videos,
        sources="photographs bundled with scikit-image (skimage.data); see the skimage data README for credits",
    )
    write_text_atomic(out / "sample.json", json.dumps(meta, indent=2) + "\n")
    return out
