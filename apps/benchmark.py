"""``densekit benchmark MODEL``: one backbone through every runtime this machine has, in one table.

Ultralytics' ``yolo benchmark`` does this for detectors; this is the same for dense features. Per runtime
(torch, ONNX Runtime float32, ONNX Runtime int8, OpenVINO, TensorRT):

- **parity** to the reference (torch; ONNX Runtime float32 when MODEL is an ``.onnx`` file): the cosine of the
  flattened feature maps and the worst per-location cosine (:func:`densekit.export.parity.compare`, the figures
  every export prints), on scikit-image's real photographs at the first size;
- **latency**: median wall milliseconds of single-frame calls at each size, after one warm-up call;
- **throughput**: frames per second of batches of ``batch`` frames at the first size;
- **J&F** on a DAVIS root (:func:`densekit.retrieval.davis_protocol.score_davis`, the protocol of
  ``densekit eval davis``; default: a small embedded sample), so a faster runtime that tracks worse shows.

A runtime that is not installed, needs a GPU, or refuses the model (an int8 export below its cosine floor)
is a row that says so, never a silent fallback to another runtime. The table is printed, and ``OUT/benchmark.json``
and ``OUT/benchmark.png`` (latency per runtime and size, J&F beside) are written atomically.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.errors import DensekitError, one_line

RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8", "openvino", "tensorrt")
DEFAULT_SIZES = ((360, 640), (480, 864))
Log = Callable[[str], None]


@dataclass
class RuntimeRow:
    """One runtime's figures; ``status`` is ``ok`` or why it has none."""

    runtime: str
    status: str = "ok"
    provider: str = ""
    cosine: float | None = None
    worst_location_cosine: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput_fps: float | None = None
    jf: float | None = None


@dataclass(frozen=True)
class BenchmarkOptions:
    """What ``densekit benchmark`` was asked (see :func:`run_benchmark`)."""

    model: str
    out: Path = Path("runs/benchmark")
    davis: Path | None = None
    runtimes: tuple[str, ...] = RUNTIMES
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    repeats: int = 5
    batch: int = 4
    threads: int | None = None
    preset: str = "dino"


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"360x640,480x864"`` -> ((360, 640), (480, 864)); anything else is one line."""
    sizes = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise DensekitError(f"--sizes: {part!r} is not HxW (e.g. 360x640)") from None
        if not (16 <= h <= 4096 and 16 <= w <= 4096):
            raise DensekitError(f"--sizes: {part} is outside 16..4096 pixels a side")
        sizes.append((h, w))
    return tuple(sizes)


def parse_runtimes(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise DensekitError(f"--runtimes: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(RUNTIMES)}")
    return names


def check_options(opts: BenchmarkOptions) -> None:
    """Bad options -> one line, before any model is built."""
    if opts.repeats < 1 or opts.batch < 1:
        raise DensekitError("--repeats and --batch must be at least 1")
    if opts.preset not in ("dino", "crw", "live"):
        raise DensekitError(f"--preset: unknown {opts.preset!r}; choose dino, crw or live")
    if opts.davis is not None:
        from densekit.serve.davis import DavisRoot

        root = DavisRoot(opts.davis)
        if not root.sequences():
            raise DensekitError(f"--davis {opts.davis}: no sequences with a first-frame mask")
    check_model(opts.model)
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DensekitError(f"--out {opts.out}: cannot create the folder ({exc.strerror or exc})") from None


def check_model(model: str) -> None:
    """A model file that is not there, or a name no backbone has, is one line before anything is built."""
    if model.lower().endswith((".onnx", ".safetensors", ".engine", ".pth", ".pt")):
        if not Path(model).is_file():
            raise DensekitError(f"MODEL {model}: file not found")
        return
    from densekit.serve.backbones import default_arch

    default_arch(model)  # an unknown name -> one line listing the known ones


# ----------------------------------------------------------------------------------------------------
# Building each runtime
# ----------------------------------------------------------------------------------------------------


def _quiet(_: str) -> None:
    pass


def _calibration_dir(work: Path) -> Path:
    """A few real photographs for int8 calibration (the same ones parity uses; no download)."""
    from densekit.apps.demo_report import write_png
    from densekit.export.parity import real_images

    calib = work / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(real_images()):
        write_png(calib / f"{i}.png", img)
    return calib


def build_runtime(name: str, model: str, work: Path, threads: int | None) -> tuple[Any | None, str]:
    """(extractor, "ok") or (None, why not) for one runtime; exports the ONNX files it needs into ``work``."""
    from densekit.serve.extractor import FeatureExtractor

    is_onnx = model.lower().endswith(".onnx")
    onnx = Path(model) if is_onnx else work / "model.onnx"
    try:
        if name == "torch":
            if is_onnx:
                return None, "skipped: an .onnx file has no torch weights"
            return FeatureExtractor(model, device="cpu", backend="torch", threads=threads), "ok"
        if name == "tensorrt":
            from densekit.apps.demo import tensorrt_unavailable

            why = tensorrt_unavailable()
            if why is not None:
                return None, why
            engine = work / "model.engine"
            _ensure_onnx(model, onnx, is_onnx)
            from densekit.export.trt import build_engine

            build_engine(onnx, engine, fp16=True, log=_quiet)
            return FeatureExtractor(engine, backend="tensorrt"), "ok"
        if name == "openvino" and importlib.util.find_spec("openvino") is None:
            return None, "skipped: openvino not installed (pip install 'densekit[openvino]')"
        if name == "onnxruntime-int8":
            if is_onnx:
                return None, "skipped: int8 needs a torch model to export and calibrate"
            from densekit.export.onnx import export_onnx

            int8 = work / "model-int8.onnx"
            if not int8.is_file():
                export_onnx(model, int8, int8_calib=_calibration_dir(work), log=_quiet)
            return FeatureExtractor(int8, device="cpu", backend="onnxruntime", threads=threads), "ok"
        _ensure_onnx(model, onnx, is_onnx)
        return FeatureExtractor(onnx, device="cpu", backend=name, threads=threads), "ok"
    except DensekitError as exc:
        return None, f"refused: {one_line(exc)}"


def _ensure_onnx(model: str, onnx: Path, is_onnx: bool) -> None:
    if not is_onnx and not onnx.is_file():
        from densekit.export.onnx import export_onnx

        export_onnx(model, onnx, log=_quiet)


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def _frames(hw: tuple[int, int], n: int) -> list[np.ndarray]:
    import cv2

    from densekit.export.parity import real_images

    imgs = real_images()
    return [cv2.resize(imgs[i % len(imgs)], (hw[1], hw[0]), interpolation=cv2.INTER_AREA) for i in range(n)]


def features_of(extractor: Any, hw: tuple[int, int]) -> np.ndarray:
    """(3, D, h, w): the parity photographs at ``hw``, one call each (batching is not what parity checks)."""
    return np.stack([extractor(f) for f in _frames(hw, 3)])


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocations, a runtime's first-run graph work
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def size_key(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def measure_speed(row: RuntimeRow, extractor: Any, opts: BenchmarkOptions) -> None:
    for hw in opts.sizes:
        frame = _frames(hw, 1)[0]
        row.latency_ms[size_key(hw)] = 1000.0 * median_seconds(lambda f=frame: extractor(f), opts.repeats)
    batch = _frames(opts.sizes[0], opts.batch)
    row.throughput_fps = opts.batch / median_seconds(lambda: extractor.batch(batch), max(1, opts.repeats // 2))


def measure_jf(extractor: Any, root: Path, out: Path, preset: str) -> float:
    from densekit.retrieval.davis_protocol import score_davis
    from densekit.retrieval.propagation import config_from_options
    from densekit.serve.davis import DavisRoot

    davis = DavisRoot(root)
    split = "val" if davis.sequences("val") else None
    seqs = davis.sequences(split) if split else davis.sequences()
    short = int(min(davis.first_mask(seqs[0]).shape))  # the frames' own short side, as the demo scores
    return float(score_davis(extractor, root, config_from_options(preset, short_side=short), out, split=split).jf)


def default_davis(work: Path) -> Path:
    """A small embedded sample (2 held-out sequences of 12 frames): J&F for every runtime in seconds."""
    from densekit.serve.sample import make_sample

    root = work / "sample"
    if not (root / "sample.json").is_file():
        make_sample(root, sequences=6, frames=12, height=240, width=432, seed=0)
    return root


# ----------------------------------------------------------------------------------------------------
# The run, the table, the plot
# ----------------------------------------------------------------------------------------------------


def run_benchmark(opts: BenchmarkOptions, log: Log = print) -> list[RuntimeRow]:
    """Measure every runtime of ``opts``; print the table and write ``OUT/benchmark.json`` and ``.png``."""
    from densekit.apps.progress import progress_bar
    from densekit.export.parity import compare

    check_options(opts)
    work = opts.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    root = opts.davis or default_davis(work)
    rows: list[RuntimeRow] = []
    reference: np.ndarray | None = None
    with progress_bar(rate=False) as progress:
        task = progress.add_task("benchmark", total=len(opts.runtimes) * 3)
        for name in opts.runtimes:
            progress.update(task, description=f"{name}: building")
            extractor, status = build_runtime(name, opts.model, work, opts.threads)
            row = RuntimeRow(name, status)
            rows.append(row)
            progress.advance(task)
            if extractor is None:
                progress.advance(task, 2)
                continue
            row.provider = f"{extractor.backend_name} ({extractor.provider})"
            feats = features_of(extractor, opts.sizes[0])
            if reference is None:
                reference = feats  # the first runtime that runs: torch, or ONNX Runtime for an .onnx MODEL
            _, row.cosine, row.worst_location_cosine = compare(reference, feats)
            progress.update(task, description=f"{name}: timing")
            measure_speed(row, extractor, opts)
            progress.advance(task)
            progress.update(task, description=f"{name}: J&F")
            row.jf = measure_jf(extractor, root, work / f"jf-{name}", opts.preset)
            progress.advance(task)
    log(f"{opts.model} on {cpu_line()}; threads {opts.threads or 'default'}; J&F on {root} ({opts.preset})")
    for line in format_table(rows, opts.sizes):
        log(line)
    write_outputs(opts, rows, root)
    log(f"wrote {opts.out / 'benchmark.json'} and {opts.out / 'benchmark.png'}")
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[RuntimeRow], sizes: tuple[tuple[int, int], ...]) -> list[str]:
    """The printed table: one line per runtime, ``status`` in place of figures where it has none."""
    keys = [size_key(hw) for hw in sizes]
    header = ["runtime", "cosine", "worst loc.", *[f"ms {k}" for k in keys], f"fps {keys[0]} batch", "J&F", "runs on"]
    body = []
    for r in rows:
        if r.status != "ok":
            body.append([r.runtime, r.status])
            continue
        body.append([r.runtime, _fmt(r.cosine, ".6f"), _fmt(r.worst_location_cosine, ".4f"),
                     *[_fmt(r.latency_ms.get(k), ".1f") for k in keys], _fmt(r.throughput_fps, ".2f"),
                     _fmt(r.jf, ".3f"), r.provider])
    widths = [max(len(header[i]), *(len(b[i]) for b in body if len(b) == len(header))) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)) if len(b) == len(header)
                     else f"{b[0].ljust(widths[0])}  {b[1]}")
    return lines


#: the SIMD flags that decide which CPU kernels run (int8 with or without VNNI, bf16 or not)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert")


def cpu_line() -> str:
    """``lscpu``'s model name, CPU count and :data:`CPU_FLAGS` present: every speed figure goes beside it."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "lscpu not available"
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    cpus = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("CPU(s)")), "?")
    return f"{model}, {cpus} CPUs, flags: {' '.join(f for f in flags if f in CPU_FLAGS) or 'none of ' + ' '.join(CPU_FLAGS)}"


def write_outputs(opts: BenchmarkOptions, rows: list[RuntimeRow], root: Path) -> None:
    data = {"model": opts.model, "davis": str(root), "preset": opts.preset, "sizes": [list(s) for s in opts.sizes],
            "repeats": opts.repeats, "batch": opts.batch, "threads": opts.threads, "cpu": cpu_line(),
            "rows": [asdict(r) for r in rows]}
    write_text_atomic(opts.out / "benchmark.json", json.dumps(data, indent=2) + "\n")
    plot(rows, opts, opts.out / "benchmark.png")


def plot(rows: list[RuntimeRow], opts: BenchmarkOptions, dest: Path) -> None:
    """Latency bars per runtime and size, each runtime's J&F written above its bars (PNG, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r.status == "ok"]
    keys = [size_key(hw) for hw in opts.sizes]
    fig = Figure(figsize=(max(5.0, 1.6 * len(ok) + 2.0), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(ok))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r.latency_ms[key] for r in ok], width=width, label=key)
    for xi, r in zip(x, ok):
        top = max(r.latency_ms.values())
        ax.annotate(f"J&F {r.jf:.3f}", (xi, top), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels([r.runtime for r in ok], fontsize=8)
    ax.set_ylabel("ms per frame (median)")
    ax.set_title(f"{Path(opts.model).name}: latency per runtime", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
