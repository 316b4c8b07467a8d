"""Benchmark: one label-propagation step, fast local-window path vs the all-pairs reference.

Setting (defaults): a 480p frame at stride 8 -> a 60 x 107 feature grid (854 x 480 / 8), D = 256 random
but spatially structured L2-normalised features (smooth random fields plus noise, each context frame a
slightly shifted version of the target, as in a video), the ``crw`` preset with its 20 short-term
frames plus the first frame (21 context frames), several objects. Each implementation runs in a fresh
subprocess on the same saved inputs so that its peak resident memory (``ru_maxrss``, minus the level
reached after loading the inputs) is its own. The masks (argmax of the soft labels) must be identical;
the script exits non-zero when they are not.

Targets: the fast path at least 5x faster than the all-pairs reference and at most 1.5 GB peak.

Run:  python benchmarks/propagation.py            (about a minute on 2 cores; needs ~5 GB free RAM)
      python benchmarks/propagation.py --preset dino --height 60 --width 104
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _structured_inputs(h: int, w: int, dim: int, n_context: int, n_objects: int, seed: int) -> dict:
    """Target and context features/labels that look like consecutive frames of a video."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    # Smooth random field (low-res noise upsampled) on a canvas larger than the frame, so each frame can
    # be a crop at a small offset (camera/object motion), plus per-frame noise.
    pad = 8
    low = torch.randn(1, dim, (h + 2 * pad) // 6 + 2, (w + 2 * pad) // 6 + 2, generator=g)
    canvas = F.interpolate(low, size=(h + 2 * pad, w + 2 * pad), mode="bilinear", align_corners=False)[0]

    def frame(t: int) -> torch.Tensor:
        dy, dx = (t * 3) % (2 * pad), (t * 5) % (2 * pad)
        f = canvas[:, dy : dy + h, dx : dx + w] + 0.3 * torch.randn(dim, h, w, generator=g)
        return F.normalize(f, dim=0).contiguous()

    # Objects: ellipses at feature resolution, moving with the crop offsets.
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    centres = []
    for _ in range(n_objects):
        u, v = torch.rand(2, generator=g).tolist()
        centres.append((h * (0.25 + 0.5 * u), w * (0.15 + 0.7 * v)))

    def labels(t: int, soft: bool) -> torch.Tensor:
        dy, dx = (t * 3) % (2 * pad), (t * 5) % (2 * pad)
        ids = torch.zeros(h, w, dtype=torch.long)
        for o, (cy, cx) in enumerate(centres, start=1):
            inside = ((yy + dy - pad - cy) / (h / 6)) ** 2 + ((xx + dx - pad - cx) / (w / 9)) ** 2 < 1
            ids[inside] = o
        onehot = F.one_hot(ids, n_objects + 1).permute(2, 0, 1).float()
        if not soft:
            return onehot
        return torch.softmax(4 * onehot + 0.5 * torch.randn(onehot.shape, generator=g), dim=0)

    n_frames = n_context + 1
    target = frame(n_frames)
    ctx_feats = [frame(0)] + [frame(t) for t in range(n_frames - n_context + 1, n_frames)]
    ctx_labels = [labels(0, soft=False)] + [labels(t, soft=True) for t in range(n_frames - n_context + 1, n_frames)]
    return {"target": target, "ctx_feats": ctx_feats, "ctx_labels": ctx_labels}


def _worker(impl: str, data_path: str, out_path: str, preset_name: str, repeats: int) -> None:
    """Run one implementation on saved inputs; print a JSON line with timings and peak memory."""
    import torch

    from densekit.retrieval.propagation import preset, propagate_step, propagate_step_dense

    fn = propagate_step if impl == "window" else propagate_step_dense
    cfg = preset(preset_name)
    data = torch.load(data_path)
    # Warm up kernels and the thread pool on a tiny grid, so timings are of the step itself.
    tiny = [torch.nn.functional.normalize(torch.randn(8, 6, 6), dim=0) for _ in range(2)]
    fn(tiny[0], tiny, [torch.ones(2, 6, 6)] * 2, cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(data["target"], data["ctx_feats"], data["ctx_labels"], cfg)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out, out_path)
    print(json.dumps({"impl": impl, "times": times, "peak_kb": peak, "base_kb": base}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="crw", choices=["crw", "dino", "live"])
    ap.add_argument("--height", type=int, default=60, help="feature grid height (480 / 8)")
    ap.add_argument("--width", type=int, default=107, help="feature grid width (854 / 8; DINO's 832 / 8 = 104)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--objects", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of the window path (median reported)")
    ap.add_argument("--dense-repeats", type=int, default=1, help="timed calls of the all-pairs path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["window", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        _worker(args.worker, args.data, args.out, args.preset, args.repeats)
        return 0

    import torch

    from densekit.retrieval.propagation import preset

    cfg = preset(args.preset)
    n_context = 1 + cfg.n_last
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "inputs.pt")
        torch.save(_structured_inputs(args.height, args.width, args.dim, n_context, args.objects, args.seed), data_path)
        results, outputs = {}, {}
        for impl, reps in (("window", args.repeats), ("dense", args.dense_repeats)):
            out_path = str(Path(tmp) / f"{impl}.pt")
            cmd = [sys.executable, __file__, "--worker", impl, "--data", data_path, "--out", out_path,
                   "--preset", args.preset, "--repeats", str(reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                print(f"error: the {impl} worker failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[impl] = torch.load(out_path)

    win, dense = outputs["window"], outputs["dense"]
    same_mask = bool(torch.equal(win.argmax(0), dense.argmax(0)))
    max_diff = float((win - dense).abs().max())
    n_diff = int((win.argmax(0) != dense.argmax(0)).sum())

    print(f"label propagation, one step: preset={args.preset} grid={args.height}x{args.width} D={args.dim} "
          f"context={n_context} frames topk={cfg.topk} radius={cfg.radius} ({cfg.window}, "
          f"first frame {'windowed' if cfg.window_first else 'full'}) C={args.objects + 1} "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'implementation':<16}{'ms/frame':>12}{'peak RSS (MB)':>16}{'  (process max RSS MB)':>24}")
    ms = {}
    for impl, name in (("window", "window (fast)"), ("dense", "all-pairs")):
        r = results[impl]
        ms[impl] = statistics.median(r["times"]) * 1e3
        delta_mb = (r["peak_kb"] - r["base_kb"]) / 1024
        print(f"{name:<16}{ms[impl]:>12.1f}{delta_mb:>16.1f}{r['peak_kb'] / 1024:>24.1f}")
    speedup = ms["dense"] / ms["window"]
    win_peak_gb = (results["window"]["peak_kb"] - results["window"]["base_kb"]) / 1024**2
    print(f"speed-up: {speedup:.1f}x (target >= 5x)   window peak: {win_peak_gb:.2f} GB (target <= 1.5 GB)")
    print(f"masks identical: {same_mask} ({n_diff} cells differ); max |soft label difference|: {max_diff:.3g}")
    if not same_mask:
        print("error: the window and all-pairs masks differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
