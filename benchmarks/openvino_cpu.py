"""ONNX Runtime vs OpenVINO on the CPU: one feature map, same .onnx, same threads.

(Not named openvino.py: a script's folder comes first on sys.path, and that name would shadow the package.)

    python benchmarks/openvino_cpu.py [--onnx r18.onnx] [--size 360,640] [--threads 2] [--rounds 5]

Without ``--onnx``, resnet18 (stride 8) is exported by densekit into a temporary folder. Rows: ONNX Runtime's CPU
provider (fp32), OpenVINO forced to f32 (dynamic H/W, what ``densekit export openvino --precision f32`` serves),
the same compiled for the one input size (static: what a per-size compile would give), and OpenVINO's default
precision when it is not f32 (bf16 on CPUs with AVX-512 BF16/AMX). Each row: median ms of ``--rounds``
interleaved single-frame runs after one warm-up (interleaved so that load from others on the machine hits every
row alike), and the cosine to ONNX Runtime on a real photo. The CPU's model and its SIMD flags and the load average
are printed beside the table: figures only mean something next to them (issue 14).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

def cpu_line() -> str:
    from densekit.apps.benchmark import cpu_line as line  # the one lscpu summary (densekit benchmark prints it too)

    return line()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="a densekit .onnx (default: resnet18 exported here)")
    parser.add_argument("--size", default="360,640", help="H,W of the frame")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per row (median)")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.size.split(","))

    import onnxruntime as ort
    import openvino as ov

    from densekit.export.parity import compare, real_images
    from densekit.serve.extractor import preprocess
    from densekit.serve.loader import OnnxRuntimeBackend
    from densekit.serve.onnx_meta import read_onnx_meta
    from densekit.serve.openvino_backend import OpenVinoBackend, cpu_has_bf16

    with tempfile.TemporaryDirectory() as work:
        path = args.onnx
        if path is None:
            from densekit.export.onnx import export_onnx

            path = Path(work) / "resnet18.onnx"
            export_onnx("resnet18", path, log=lambda _m: None)
        meta = read_onnx_meta(path)
        x = preprocess([real_images()[0]], meta, (h, w))
        runners = {"onnxruntime CPU fp32": OnnxRuntimeBackend(path, "cpu", threads=args.threads),
                   "openvino f32 (dynamic H/W)": OpenVinoBackend(path, threads=args.threads, precision="f32")}
        static = OpenVinoBackend(path, threads=args.threads, precision="f32")
        model = ov.Core().read_model(str(path))
        model.reshape([1, 3, h, w])
        static.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                  "INFERENCE_NUM_THREADS": args.threads,
                                                                  "PERFORMANCE_HINT": "LATENCY"})
        static.request = static.compiled.create_infer_request()
        runners[f"openvino f32 (static {h}x{w})"] = static
        default = OpenVinoBackend(path, threads=args.threads)
        if default.precision != "f32":
            runners[f"openvino {default.precision} (its default)"] = default
        times = _interleaved(runners, x, args.rounds)
        ref = runners["onnxruntime CPU fp32"].run(x)
        cosines = {name: compare(ref, r.run(x))[1] for name, r in runners.items()}

    print(f"{meta.name} stride {meta.stride}, 1x3x{h}x{w}, {args.threads} threads, median of {args.rounds} "
          f"interleaved runs; onnxruntime {ort.__version__}, openvino {ov.__version__.split('-')[0]}")
    print(f"CPU: {cpu_line()}; OpenVINO capabilities: "
          f"{', '.join(ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}; "
          f"auto picks {'openvino' if cpu_has_bf16() else 'onnxruntime'}; load average {os.getloadavg()[0]:.1f}")
    print(f"| {'runtime':<30} | {'provider':<20} | {'ms/frame':>8} | {'vs ORT':>6} | {'cosine to ORT':>13} |")
    print(f"|{'-' * 32}|{'-' * 22}|{'-' * 10}|{'-' * 8}|{'-' * 15}|")
    base = times["onnxruntime CPU fp32"]
    for name, runner in runners.items():
        print(f"| {name:<30} | {runner.provider:<20} | {times[name] * 1000:8.1f} | {times[name] / base:5.2f}x | "
              f"{cosines[name]:13.7f} |")
    return 0


def _interleaved(runners: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median seconds per run of each runner, one run of each per round after one warm-up each."""
    for runner in runners.values():
        runner.run(x)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(x)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


if __name__ == "__main__":
    raise SystemExit(main())
