"""The DAVIS dataset layout (DAVIS-2016, Perazzi et al. CVPR 2016; DAVIS-2017, Pont-Tuset et al. 2017).

::

    root/
      JPEGImages/480p/<seq>/00000.jpg ...
      Annotations/480p/<seq>/00000.png ...     2016: grayscale 0/255; 2017: palette PNG, object ids
      ImageSets/480p/<split>.txt               2016: lines "/JPEGImages/480p/<seq>/00000.jpg /Annotations/..."
      ImageSets/2017/<split>.txt               2017: one sequence name a line (2016/<split>.txt likewise)

Frames and annotations are matched by file stem. Test-style 2017 sets ship only the first frame's
annotation, so :meth:`DavisRoot.annotation_paths` lists the annotations that exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from densekit.serve.errors import DensekitError
from densekit.serve.imageio import IMAGE_SUFFIXES, natural_key, read_mask

__all__ = ["DavisRoot"]


def _images(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DensekitError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return h, w


class DavisRoot:
    """A DAVIS-2016 or DAVIS-2017 dataset folder.

    Attributes:
        root: the dataset folder.
        resolution: the resolution folder name (``"480p"``).
        year: 2017 when ``ImageSets/2017`` exists or the annotations are palette PNGs, else 2016
            (binary 0/255 masks, read as 0/1).

    Raises:
        DensekitError: ``root`` is missing or has no ``JPEGImages/<resolution>`` folder.
    """

    def __init__(self, root: str | os.PathLike[str], resolution: str = "480p") -> None:
        self.root = Path(root)
        self.resolution = resolution
        if not self.root.is_dir():
            raise DensekitError(f"DAVIS root not found: {self.root}")
        self.images_dir = self.root / "JPEGImages" / resolution
        self.annotations_dir = self.root / "Annotations" / resolution
        if not self.images_dir.is_dir():
            raise DensekitError(f"{self.root} is not a DAVIS root: no JPEGImages/{resolution} folder")
        self.year = self._detect_year()

    def __repr__(self) -> str:
        return f"DavisRoot({str(self.root)!r}, year={self.year}, sequences={len(self.sequences())})"

    # -- layout ------------------------------------------------------------------------------------------

    def _detect_year(self) -> int:
        if (self.root / "ImageSets" / "2017").is_dir():
            return 2017
        if self.annotations_dir.is_dir():
            for seq_dir in sorted(p for p in self.annotations_dir.iterdir() if p.is_dir()):
                pngs = _images(seq_dir, (".png",))
                if pngs:
                    try:
                        with Image.open(pngs[0]) as im:
                            return 2017 if im.mode in ("P", "PA") else 2016
                    except (OSError, SyntaxError, ValueError):
                        raise DensekitError(f"cannot read annotation {pngs[0]}") from None
        return 2016

    def _split_dirs(self) -> list[Path]:
        """Folders that may hold ``<split>.txt``, most specific first."""
        sets = self.root / "ImageSets"
        order = ["2017", self.resolution, "2016"] if self.year == 2017 else [self.resolution, "2016", "2017"]
        return [sets / d for d in order] + [sets]

    def splits(self) -> list[str]:
        """Names of the split files found under ``ImageSets`` (e.g. ``['train', 'val']``)."""
        names: set[str] = set()
        for d in self._split_dirs():
            if d.is_dir():
                names.update(p.stem for p in d.glob("*.txt"))
        return sorted(names)

    def _split_file(self, split: str) -> Path:
        for d in self._split_dirs():
            p = d / f"{split}.txt"
            if p.is_file():
                return p
        avail = self.splits()
        raise DensekitError(
            f"no split {split!r} in {self.root / 'ImageSets'}; available: {', '.join(avail) if avail else 'none'}"
        )

    def sequences(self, split: str | None = None) -> list[str]:
        """Sequence names of ``split``, or every folder of ``JPEGImages/<res>`` when ``split`` is None.

        Split files are either one sequence name a line (DAVIS-2017) or lines of frame and mask paths
        (DAVIS-2016 ``ImageSets/480p``), from which the sequence folder is taken. Order is kept.

        Raises:
            DensekitError: unknown split (the message lists the available ones), or a listed sequence
                without a ``JPEGImages`` folder.
        """
        if split is None:
            return sorted((p.name for p in self.images_dir.iterdir() if p.is_dir()), key=natural_key)
        path = self._split_file(split)
        seen: dict[str, None] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            token = line.split()[0]
            if "/" in token:
                parts = [t for t in token.split("/") if t]
                if "JPEGImages" in parts and parts.index("JPEGImages") + 2 < len(parts):
                    name = parts[parts.index("JPEGImages") + 2]
                elif len(parts) >= 2:
                    name = parts[-2]  # ".../<seq>/<frame>"
                else:
                    raise DensekitError(f"{path}: cannot read a sequence from line {line!r}")
            else:
                name = token
            seen.setdefault(name, None)
        seqs = list(seen)
        missing = [s for s in seqs if not (self.images_dir / s).is_dir()]
        if missing:
            raise DensekitError(
                f"split {split!r} lists {len(missing)} sequence(s) with no JPEGImages/{self.resolution} folder: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        return seqs

    # -- one sequence --------------------------------------------------------------------------------------

    def _seq_dir(self, seq: str) -> Path:
        d = self.images_dir / seq
        if not d.is_dir():
            raise DensekitError(f"sequence {seq!r} not found: no folder {d}")
        return d

    def frame_paths(self, seq: str) -> list[Path]:
        """Frame files of ``seq`` (any of ``IMAGE_SUFFIXES``) in natural order."""
        frames = _images(self._seq_dir(seq), IMAGE_SUFFIXES)
        if not frames:
            raise DensekitError(f"sequence {seq!r} has no frames in {self.images_dir / seq}")
        stems = [p.stem for p in frames]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise DensekitError(f"sequence {seq!r} has two frames named {dup!r} (different extensions)")
        return frames

    def frame_names(self, seq: str) -> list[str]:
        """Frame stems of ``seq`` (``'00000'``, ``'00001'``...)."""
        return [p.stem for p in self.frame_paths(seq)]

    def annotation_paths(self, seq: str) -> list[Path]:
        """Annotation PNGs of ``seq`` that exist, in frame order (matched to frames by stem).

        Raises:
            DensekitError: an annotation whose stem matches no frame.
        """
        names = self.frame_names(seq)
        d = self.annotations_dir / seq
        if not d.is_dir():
            return []
        by_stem = {p.stem: p for p in _images(d, (".png",))}
        orphans = sorted(set(by_stem) - set(names), key=natural_key)
        if orphans:
            raise DensekitError(f"sequence {seq!r}: annotation {orphans[0]}.png has no matching frame")
        return [by_stem[n] for n in names if n in by_stem]

    def first_mask(self, seq: str) -> np.ndarray:
        """The first frame's annotation as ``(H, W)`` uint8 ids (0/255 masks read as 0/1).

        Raises:
            DensekitError: the first frame has no annotation, or its size differs from the frame.
        """
        names = self.frame_names(seq)
        p = self.annotations_dir / seq / f"{names[0]}.png"
        if not p.is_file():
            raise DensekitError(f"sequence {seq!r} has no annotation for its first frame {names[0]} ({p})")
        mask = read_mask(p)
        fh, fw = _image_size(self.frame_paths(seq)[0])
        if mask.shape != (fh, fw):
            raise DensekitError(f"{p}: mask is {mask.shape[1]}x{mask.shape[0]}, frame is {fw}x{fh}")
        return mask

    def read_gt(self, seq: str) -> np.ndarray:
        """Every frame's annotation as a ``(T, H, W)`` uint8 stack of ids.

        DAVIS-2016 0/255 masks become 0/1; 255 (void) in 2017 palette masks is kept.

        Raises:
            DensekitError: a frame has no annotation, or the masks do not all have the frames' size.
        """
        frames = self.frame_paths(seq)
        annos = self.annotation_paths(seq)
        if len(annos) != len(frames):
            have = {p.stem for p in annos}
            missing = [f.stem for f in frames if f.stem not in have]
            raise DensekitError(
                f"sequence {seq!r}: {len(missing)} of {len(frames)} frames have no annotation "
                f"(first: {missing[0]}); ground truth needs one per frame"
            )
        size = _image_size(frames[0])
        out = np.empty((len(annos),) + size, np.uint8)
        for i, p in enumerate(annos):
            m = read_mask(p)
            if m.shape != size:
                raise DensekitError(
                    f"sequence {seq!r}: {p.name} is {m.shape[1]}x{m.shape[0]}, frames are {size[1]}x{size[0]}"
                )
            out[i] = m
        return out
