"""Benchmark: per-frame latency of live mask tracking with an ONNX model on the CPU, and what it costs in J&F.

The per-frame step of live tracking is: dense features of the new frame (ONNX Runtime), label propagation
from the context frames (``MaskPropagator.step`` minus the extractor call: re-normalisation, the window
search, soft labels to an id mask), and drawing the overlay (``densekit.serve.imageio.overlay``). Decoding
is not part of it (frames are decoded before timing).

Setting (defaults, issue 6 item 4): ``resnet18`` at stride 8 exported to ONNX with
``densekit.export.onnx.export_onnx`` into ``--work``, opened by ``FeatureExtractor`` on ONNX Runtime's CPU
provider with ``intra_op_num_threads = --threads`` (2), torch on ``--torch-threads`` (default the same); a
real clip (davis2016-mini ``motorbike``, 43 frames of 854x480, from ``../shared/data``; a ``make_sample``
sequence when that is absent) turned into a 480p and a 360p video (shorter side 480 / 360, INTER_AREA),
tracked from its first ground-truth mask with each preset, the preset's processing short side set to the
video's (``preset(name, short_side=R)``, the presets' short-side rule: native-resolution presets too are
resized DINO's way, longer side floored to 64).
Timings are of the steady state (frames after the short-term queue is full): mean over frames of each
frame's fastest of ``--repeats`` runs, stage by stage, as wall time and as CPU time of the process (all
threads; less sensitive to other jobs on a shared machine, but it counts threads spinning while they wait).

``--int8`` adds an int8 copy of the model: ``densekit export onnx --int8`` (ONNX Runtime static
quantization: QDQ, per-channel int8 weights, uint8 activations, min-max calibration at 360x640 on 8 frames
of ``videos/bikes.mp4`` - not a DAVIS clip - or of a make_sample sequence), in the latency and the quality
tables.

Quality (``--quality-models``, default efficientnet_lite0 and resnet18, both ONNX): J&F-Mean, J-Mean and
F-Mean on all of davis2016-mini, for every preset and processing short side R, by
``densekit.retrieval.davis_protocol.score_davis`` (the protocol of ``densekit eval davis --short-side R``
and of the app: 854x480 frames in, processed at R, masks out at 854x480).

``--app`` adds the application-overhead rows (issue 6: at most 20 % over ``densekit track``): the app's
per-frame loop (``densekit.apps.app.tracking_loop``: frames from the session's store, masks into its memory
map, the display overlay rendered) against the ``densekit track`` loop (``densekit.retrieval.davis_protocol.propagate_to_dir``:
frames decoded from a folder, one palette PNG written per frame) on the same R-p video, model and preset.
Gradio's own transport of each picture to the page is not part of either.

Run:  python benchmarks/live_latency.py --int8 --app          (~30 min on 2 quiet cores, most of it J&F)
      python benchmarks/live_latency.py --no-quality --presets dino,live --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DENSEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
INT8_SUFFIX = "-int8"


# ----------------------------------------------------------------------------------------------------
# models


def onnx_model(name: str, work: Path, log: Callable[[str], None] = print) -> Path:
    """``work/<name>.onnx``, exported (parity-checked) unless it is already there."""
    from densekit.export.onnx import export_onnx

    path = work / f"{Path(name).stem}.onnx"
    if path.is_file():
        log(f"reusing {path}")
        return path
    t0 = time.perf_counter()
    export_onnx(name, path, log=lambda _msg: None)
    log(f"exported {name} to {path} in {time.perf_counter() - t0:.0f} s")
    return path


def calibration_frames(work: Path, n: int = 8) -> list[np.ndarray]:
    """``n`` frames spread over videos/bikes.mp4 (not a DAVIS clip), or over a make_sample sequence."""
    from densekit.serve.imageio import open_video

    video = SHARED / "videos" / "bikes.mp4"
    if not video.is_file():
        root = davis_root(work, prefer_shared=False)
        from densekit.serve.davis import DavisRoot

        video = DavisRoot(root).frame_paths(DavisRoot(root).sequences()[0])[0].parent
    frames = list(open_video(video))
    return [frames[i] for i in np.linspace(0, len(frames) - 1, n).round().astype(int)]


def int8_model(name: str, work: Path, log: Callable[[str], None] = print) -> Path:
    """``work/<name>-int8.onnx`` from ``densekit export onnx --int8`` (what a user gets), calibrated on
    :func:`calibration_frames` at the exporter's calibration size."""
    from PIL import Image

    from densekit.export.onnx import export_onnx

    dst = work / f"{Path(name).stem}{INT8_SUFFIX}.onnx"
    if dst.is_file():
        log(f"reusing {dst}")
        return dst
    calib = work / "calibration"
    calib.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(calibration_frames(work)):
        Image.fromarray(frame).save(calib / f"{i:02d}.png")
    t0 = time.perf_counter()
    report = export_onnx(name, dst, int8_calib=calib, log=lambda _msg: None)
    cos = min(r.cosine for r in report.parity)
    log(f"exported {name} as int8 to {dst} in {time.perf_counter() - t0:.0f} s (parity cosine {cos:.4f})")
    return dst


def model_file(name: str, work: Path, log: Callable[[str], None] = print) -> Path:
    """The ONNX file of ``name`` (``<backbone>`` or ``<backbone>-int8``)."""
    if name.endswith(INT8_SUFFIX):
        return int8_model(name[: -len(INT8_SUFFIX)], work, log)
    return onnx_model(name, work, log)


# ----------------------------------------------------------------------------------------------------
# data


@dataclass
class Clip:
    """Frames (H, W, 3) uint8 and ground-truth id masks (H, W) uint8 of one sequence."""

    name: str
    frames: list[np.ndarray]
    gt: list[np.ndarray]
    frame_names: list[str] = field(default_factory=list)


def davis_root(work: Path, prefer_shared: bool = True) -> Path:
    """davis2016-mini from the shared data, or a make_sample dataset written into ``work``."""
    root = SHARED / "davis2016-mini"
    if prefer_shared and (root / "JPEGImages").is_dir():
        return root
    from densekit.serve.sample import make_sample

    out = work / "sample"
    if not (out / "sample.json").is_file():
        make_sample(out, sequences=3, frames=30, height=480, width=854)
    return out


def load_clip(root: Path, seq: str) -> Clip:
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_image

    davis = DavisRoot(root)
    frames = [read_image(p) for p in davis.frame_paths(seq)]
    gt = list(davis.read_gt(seq))
    return Clip(seq, frames, gt, davis.frame_names(seq))


def at_resolution(clip: Clip, short: int) -> Clip:
    """The clip as an R-p video: shorter side ``short`` (even other side), INTER_AREA; masks nearest."""
    import cv2

    h, w = clip.frames[0].shape[:2]
    if min(h, w) == short:
        return clip
    s = short / min(h, w)
    nh, nw = (short, 2 * round(w * s / 2)) if h <= w else (2 * round(h * s / 2), short)
    frames = [cv2.resize(f, (nw, nh), interpolation=cv2.INTER_AREA) for f in clip.frames]
    gt = [cv2.resize(g, (nw, nh), interpolation=cv2.INTER_NEAREST) for g in clip.gt]
    return Clip(clip.name, frames, gt, clip.frame_names)


def live_config(name: str, short: int):  # noqa: ANN201 - a PropagationConfig
    """Preset ``name`` at processing short side ``short`` (the presets' short-side rule)."""
    from densekit.retrieval.propagation import preset

    return preset(name, short_side=short)


# ----------------------------------------------------------------------------------------------------
# tracking with a per-stage clock


class _Clock:
    """Wall and process-CPU seconds."""

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()


class TimedExtractor:
    """Wraps a FeatureExtractor and accumulates the (wall, CPU) seconds spent in it."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner
        self.meta = inner.meta
        self.wall = self.cpu = 0.0

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        w0, c0 = _Clock.now()
        out = self.inner(frame, size=size)
        w1, c1 = _Clock.now()
        self.wall += w1 - w0
        self.cpu += c1 - c0
        return out


@dataclass
class Timing:
    """Per steady-state frame: wall seconds of each stage, and CPU seconds of the whole step."""

    features: list[float] = field(default_factory=list)
    propagation: list[float] = field(default_factory=list)
    overlay: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def ms(self) -> dict[str, float]:
        """Mean milliseconds per frame: features, propagation, overlay, total (wall) and cpu."""
        mean = {k: 1e3 * float(np.mean(getattr(self, k))) if getattr(self, k) else float("nan")
                for k in ("features", "propagation", "overlay", "cpu")}
        mean["total"] = mean["features"] + mean["propagation"] + mean["overlay"]
        return mean


def track(extractor, clip: Clip, config, draw: bool = True) -> tuple[list[np.ndarray], Timing]:  # noqa: ANN001
    """Track ``clip`` from its first mask; masks of every frame and the steady-state timings."""
    from densekit.retrieval.propagation import MaskPropagator
    from densekit.serve.imageio import overlay

    timed = TimedExtractor(extractor)
    prop = MaskPropagator(timed, config)
    masks = [prop.start(clip.frames[0], clip.gt[0])]
    steady = 0 if config.pad_with_first else config.n_last
    timing = Timing()
    for i, frame in enumerate(clip.frames[1:], start=1):
        timed.wall = timed.cpu = 0.0
        w0, c0 = _Clock.now()
        mask = prop.step(frame)
        w1, _ = _Clock.now()
        if draw:
            overlay(frame, mask)
        w2, c2 = _Clock.now()
        masks.append(mask)
        if i > steady:
            timing.features.append(timed.wall)
            timing.propagation.append(w1 - w0 - timed.wall)
            timing.overlay.append(w2 - w1)
            timing.cpu.append(c2 - c0)
    return masks, timing


def best_of(extractor, clip: Clip, config, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """:meth:`Timing.ms` of ``repeats`` runs, each frame's stage taking its fastest run.

    On a shared machine another job's burst slows a few frames of one run; the per-frame minimum drops
    those frames' slow copies without favouring any stage (each stage keeps its own minimum).
    """
    runs = [track(extractor, clip, config)[1] for _ in range(repeats)]
    best = Timing(*(list(np.min([getattr(r, k) for r in runs], axis=0)) for k in ("features", "propagation",
                                                                                 "overlay", "cpu")))
    return best.ms()


# ----------------------------------------------------------------------------------------------------
# quality


def jf_of(extractor, root: Path, config, out: Path) -> dict[str, float]:  # noqa: ANN001
    """J&F-Mean, J-Mean, F-Mean on every sequence of ``root`` (``score_davis``: masks into ``out``)."""
    from densekit.retrieval.davis_protocol import score_davis

    return score_davis(extractor, root, config, out, workers=1).summary()


# ----------------------------------------------------------------------------------------------------
# app overhead


def _per_frame(loop: Callable[[], int], repeats: int) -> float:
    """Best wall seconds per frame of ``loop()`` (which returns the number of frames it tracked)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = loop()
        best = min(best, (time.perf_counter() - t0) / max(1, n))
    return best


def app_overhead(extractor, clip: Clip, config, work: Path, repeats: int) -> str:  # noqa: ANN001
    """A line comparing the app's tracking loop with the ``densekit track`` loop, or why it could not."""
    try:
        from densekit.apps.app import tracking_loop
    except ImportError as exc:
        return f"app overhead: not measured ({exc})"
    from rich.progress import Progress

    from densekit.retrieval.davis_protocol import propagate_to_dir
    from densekit.retrieval.propagation import MaskPropagator
    from densekit.serve.imageio import open_video, write_mask

    folder = work / f"video-{clip.name}-{min(clip.frames[0].shape[:2])}p"
    if not folder.is_dir():
        import cv2

        folder.mkdir(parents=True)
        for i, f in enumerate(clip.frames):
            cv2.imwrite(str(folder / f"{i:05d}.png"), f[:, :, ::-1])  # lossless: both paths see the same pixels
    first = folder.parent / f"{folder.name}-mask.png"
    write_mask(first, clip.gt[0])
    video = open_video(folder)
    frames = list(video)

    def cli_loop() -> int:
        with tempfile.TemporaryDirectory(dir=work) as out, Progress(disable=True) as progress:
            bar = progress.add_task("track", total=len(video), rate="")
            n = propagate_to_dir(MaskPropagator(extractor, config), iter(video), clip.gt[0], Path(out), video.names,
                                 lambda done, _m: progress.update(bar, completed=done, rate=""))
        return n - 1

    def app_loop() -> int:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            return sum(1 for _ in tracking_loop(extractor, frames, clip.gt[0], config, workdir=Path(tmp), render=True))

    cli_loop(), app_loop()  # warm-up
    cli_s = app_s = float("inf")
    for _ in range(repeats):  # interleaved, so that a burst of other work hits both alike
        cli_s, app_s = min(cli_s, _per_frame(cli_loop, 1)), min(app_s, _per_frame(app_loop, 1))
    return (
        f"app overhead ({min(clip.frames[0].shape[:2])}p, whole clip incl. the queue's filling): densekit track loop "
        f"{cli_s * 1e3:.1f} ms/frame, app loop {app_s * 1e3:.1f} ms/frame -> {100 * (app_s / cli_s - 1):+.1f} % "
        "(target <= +20 %)"
    )


def latency_table(args, clip: Clip, root_name: str, videos: dict, extractors: dict, presets: list[str]) -> None:  # noqa: ANN001
    """Print the latency table: per resolution, model and preset, the wall ms/frame of each stage."""
    import torch

    from densekit.retrieval.propagation import processing_size

    meta = extractors[args.model].meta
    print(
        f"\nlive tracking latency: {args.model} (stride {meta.stride}, D={meta.dim}) on ONNX Runtime "
        f"{extractors[args.model].provider}, intra-op threads={args.threads}, torch threads={torch.get_num_threads()}; "
        f"clip {root_name}/{clip.name} ({len(clip.frames)} frames of {clip.frames[0].shape[1]}x{clip.frames[0].shape[0]});"
        f" per frame the fastest of {args.repeats} runs, mean over steady-state frames; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    head = f"{'video':>5} {'model':>14} {'preset':>6} {'grid':>6}"
    print(f"{head} | {'features':>8} {'propag.':>8} {'overlay':>8} {'total':>8} {'fps':>6} | {'CPU ms':>7}")
    print(f"{'':>{len(head)}} | {'wall ms/frame':^42} | {'/frame':>7}")
    for short, video in videos.items():
        for model, ext in extractors.items():
            track(ext, Clip(clip.name, video.frames[:3], video.gt[:3]), live_config(presets[0], short))  # warm-up
            for name in presets:
                cfg = live_config(name, short)
                r = best_of(ext, video, cfg, args.repeats)
                ph, pw = processing_size(*video.frames[0].shape[:2], cfg, ext.meta.input_multiple)
                grid = f"{ph // ext.meta.stride}x{pw // ext.meta.stride}"
                print(
                    f"{f'{short}p':>5} {model:>14} {name:>6} {grid:>6} | {r['features']:>8.1f} {r['propagation']:>8.1f} "
                    f"{r['overlay']:>8.1f} {r['total']:>8.1f} {1e3 / r['total']:>6.2f} | {r['cpu']:>7.1f}",
                    flush=True,
                )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


# ----------------------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "densekit-live",
                    help="ONNX files, videos and masks go here (reused between runs)")
    ap.add_argument("--model", default="resnet18", help="backbone exported for the latency table")
    ap.add_argument("--int8", action="store_true", help="also time (and score) an int8-quantized copy of it")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch threads (0: same as --threads)")
    ap.add_argument("--resolutions", default="480,360", help="shorter sides of the tracked video")
    ap.add_argument("--presets", default="dino,crw,live", help="propagation presets (the first is the baseline)")
    ap.add_argument("--sequence", default="motorbike", help="sequence timed (the first one when absent)")
    ap.add_argument("--frames", type=int, default=0, help="time only the first N frames of it (0: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (best reported)")
    ap.add_argument("--quality-models", default="efficientnet_lite0,resnet18",
                    help="models of the J&F table (append -int8 for a quantized copy)")
    ap.add_argument("--quality-presets", default="", help="presets of the J&F table (default: --presets)")
    ap.add_argument("--no-quality", action="store_true", help="skip the J&F table")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency table (J&F only)")
    ap.add_argument("--app", action="store_true", help="add the app-overhead rows (needs densekit.apps.app)")
    args = ap.parse_args(argv)

    import torch

    from densekit.retrieval.propagation import PRESETS
    from densekit.serve.davis import DavisRoot
    from densekit.serve.extractor import FeatureExtractor

    presets = _split(args.presets)
    quality_presets = _split(args.quality_presets) or presets
    unknown = [p for p in presets + quality_presets if p not in PRESETS]
    if unknown:
        print(f"error: unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    resolutions = [int(r) for r in _split(args.resolutions)]
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads or args.threads)

    root = davis_root(args.work)
    seqs = DavisRoot(root).sequences()
    clip = load_clip(root, args.sequence if args.sequence in seqs else seqs[0])
    if args.frames:
        clip = Clip(clip.name, clip.frames[: args.frames], clip.gt[: args.frames], clip.frame_names[: args.frames])
    videos = {r: at_resolution(clip, r) for r in resolutions}
    models = [args.model] + ([args.model + INT8_SUFFIX] if args.int8 else [])
    extractors = {
        m: FeatureExtractor(model_file(m, args.work), device="cpu", threads=args.threads) for m in models
    }
    if not args.no_latency:
        latency_table(args, clip, root.name, videos, extractors, presets)

    if args.app:
        for short in resolutions:
            cfg = live_config(presets[-1], short)
            print(f"[{presets[-1]}] " + app_overhead(extractors[args.model], videos[short], cfg, args.work, args.repeats),
                  flush=True)

    if not args.no_quality:
        print(f"\nquality on {root} ({len(seqs)} sequences, every frame; score_davis at processing short side R), "
              "ONNX models:")
        print(f"{'model':>20} {'video':>5} {'preset':>6} {'J&F':>6} {'J':>6} {'F':>6}")
        quality_models = _split(args.quality_models)
        if args.int8 and args.model + INT8_SUFFIX not in quality_models:
            quality_models.append(args.model + INT8_SUFFIX)
        for model in quality_models:
            ext = extractors.get(model) or FeatureExtractor(
                model_file(model, args.work, log=lambda _m: None), device="cpu", threads=args.threads
            )
            for short in resolutions:
                for name in quality_presets:
                    out = args.work / "masks" / model / f"{name}_{short}p"
                    s = jf_of(ext, root, live_config(name, short), out)
                    print(f"{model:>20} {f'{short}p':>5} {name:>6} {s['J&F']:>6.3f} {s['J']:>6.3f} {s['F']:>6.3f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
