"""One-click (and 3, 5 clicks) IoU of the app's click selection on DAVIS first frames.

For each sequence's first frame of ``--root`` (default ../shared/data/davis2016-val12) the app's default
model gives the features (Engine.features, as the Track tab computes them). A simulated user clicks
positively at the object's deepest interior point (the distance-transform maximum of the true mask), then
each further click goes to the deepest point of the largest error region: positive in a missed part,
negative in a wrongly taken one. Prints per sequence and method the IoU after 1, 3 and 5 clicks and the
slowest click (s); ``--out`` writes the same as JSON.

Run: python benchmarks/click_iou.py [--root DIR] [--methods grabcut,superpixels] [--clicks 5] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DENSEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def deepest(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centre of the distance-transform maximum of (H, W) bool ``mask`` (outside = border)."""
    import cv2

    dt = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return c + 0.5, r + 0.5


def next_click(pred: np.ndarray, gt: np.ndarray):  # noqa: ANN201
    """The simulated user's next Click: deepest point of the largest error region, or None if none."""
    from scipy import ndimage

    from densekit.apps.app.selection import Click

    best = None
    for err, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        lab, n = ndimage.label(err)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            k = int(np.argmax(sizes)) + 1
            if best is None or sizes[k - 1] > best[0]:
                best = (sizes[k - 1], lab == k, positive)
    return None if best is None else Click(*deepest(best[1]), best[2])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def clicks_iou(frame: np.ndarray, feats: np.ndarray, gt: np.ndarray, method: str, n: int) -> tuple[list[float], float]:
    """IoU after each of ``n`` simulated clicks, and the slowest click's seconds (regions included once)."""
    from densekit.apps.app.selection import Click, frame_regions, select

    regions = frame_regions(frame, feats)
    clicks = [Click(*deepest(gt))]
    ious: list[float] = []
    slowest = 0.0
    while len(ious) < n:
        t0 = time.perf_counter()
        pred = select(regions, clicks, method=method).mask
        slowest = max(slowest, time.perf_counter() - t0)
        ious.append(iou(pred, gt))
        nxt = next_click(pred, gt)
        if nxt is None:
            ious += [ious[-1]] * (n - len(ious))
            break
        clicks.append(nxt)
    return ious, slowest


def main() -> None:
    import cv2
    import torch

    from densekit.apps.app.engine import DEFAULT_MODEL, Engine, shared_extractor
    from densekit.serve.davis import DavisRoot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=SHARED / "davis2016-val12")
    ap.add_argument("--methods", default="superpixels,grabcut", help="comma-separated; the first row is today's")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not args.root.is_dir():
        sys.exit(f"no DAVIS folder at {args.root}")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    engine = Engine(shared_extractor(DEFAULT_MODEL), model_label=DEFAULT_MODEL)
    davis = DavisRoot(args.root)
    methods = args.methods.split(",")
    rows: dict[str, dict[str, dict]] = {m: {} for m in methods}
    shown = [1, 3, 5] if args.clicks >= 5 else list(range(1, args.clicks + 1))
    print(f"{'sequence':20s} {'method':12s} " + " ".join(f"{k:>2d}-click" for k in shown) + "  slowest s")
    for seq in davis.sequences():
        frame = cv2.cvtColor(cv2.imread(str(args.root / "JPEGImages/480p" / seq / "00000.jpg")), cv2.COLOR_BGR2RGB)
        gt = cv2.imread(str(args.root / "Annotations/480p" / seq / "00000.png"), cv2.IMREAD_GRAYSCALE) > 127
        feats = engine.features(frame)
        for m in methods:
            ious, slowest = clicks_iou(frame, feats, gt, m, args.clicks)
            rows[m][seq] = {"iou": ious, "slowest_s": slowest}
            print(f"{seq:20s} {m:12s} " + " ".join(f"{ious[k - 1]:8.3f}" for k in shown) + f"  {slowest:8.2f}", flush=True)
    summary = {}
    for m in methods:
        mean = np.mean([r["iou"] for r in rows[m].values()], axis=0)
        summary[m] = [float(v) for v in mean]
        print(f"{'MEAN':20s} {m:12s} " + " ".join(f"{mean[k - 1]:8.3f}" for k in shown))
    if args.out:
        try:
            cpu = next(
                ln.split(":", 1)[1].strip()
                for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ln.startswith("Model name")
            )
        except (OSError, StopIteration):
            cpu = platform.processor()
        args.out.write_text(
            json.dumps({"root": str(args.root), "cpu": cpu, "threads": args.threads, "mean": summary, "sequences": rows}, indent=1),
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
