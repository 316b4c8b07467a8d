"""Export benchmark: torch eager vs ONNX Runtime on this machine, plus export time and parity.

    python benchmarks/export.py [--models resnet18,timm:vit_small_patch16_224] [--size 480,848] [--frames 5]

Per model: export time (``densekit export onnx`` with verification), parity (max |diff| and cosine
on real photos at 480p), per-frame latency (median of --frames single-frame runs after one warm-up)
and throughput (batch of 4 frames) for torch eager (``inference_mode``) and ONNX Runtime (CPU provider,
default threads). Target (issue 4): ONNX Runtime latency <= 0.8x torch eager. GPU rows (TensorRT fp16
vs ONNX Runtime CUDA) only when CUDA and TensorRT are there; otherwise one line says they were skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    from densekit.apps.benchmark import median_seconds  # one timing rule for `densekit benchmark` and this

    return median_seconds(fn, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,timm:vit_small_patch16_224")
    parser.add_argument("--size", default="480,848", help="H,W of the benchmark frames (480p DAVIS, multiple of 16)")
    parser.add_argument("--frames", type=int, default=5, help="timed repeats per measurement")
    parser.add_argument("--batch", type=int, default=4, help="batch size for throughput")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from densekit.export.onnx import export_onnx
    from densekit.export.parity import compare, real_images
    from densekit.serve.extractor import OnnxRuntimeBackend, preprocess
    from densekit.serve.loader import load_backbone

    h, w = (int(v) for v in args.size.split(","))
    photos = real_images()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
        f"frames {h}x{w}, median of {args.frames}"
    )
    header = (
        f"| {'model':<28} | {'export s':>8} | {'max abs diff':>12} | {'cosine':>10} | {'torch ms/frame':>14} | "
        f"{'ORT ms/frame':>12} | {'ORT/torch':>9} | {'torch fps (b' + str(args.batch) + ')':>15} | "
        f"{'ORT fps (b' + str(args.batch) + ')':>13} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            net = load_backbone(name).eval()
            path = Path(tmp) / "model.onnx"
            t0 = time.perf_counter()
            export_onnx(net, path, log=lambda _msg: None)
            export_s = time.perf_counter() - t0
            runner = OnnxRuntimeBackend(path, device="cpu")
            one = preprocess([photos[0]], net.meta, (h, w))
            many = preprocess([photos[i % 3] for i in range(args.batch)], net.meta, (h, w))

            def torch_run(x):
                with torch.inference_mode():
                    return net(torch.from_numpy(x)).numpy()

            max_abs, cos, _ = compare(torch_run(one), runner.run(one))
            t_torch = timed(lambda: torch_run(one), args.frames)
            t_ort = timed(lambda: runner.run(one), args.frames)
            b_torch = timed(lambda: torch_run(many), max(1, args.frames // 2))
            b_ort = timed(lambda: runner.run(many), max(1, args.frames // 2))
            print(
                f"| {name:<28} | {export_s:>8.1f} | {max_abs:>12.3g} | {cos:>10.7f} | {1000 * t_torch:>14.1f} | "
                f"{1000 * t_ort:>12.1f} | {t_ort / t_torch:>9.2f} | {args.batch / b_torch:>15.2f} | "
                f"{args.batch / b_ort:>13.2f} |"
            )
            sys.stdout.flush()
        gpu = torch.cuda.is_available()
        try:
            import tensorrt  # noqa: F401

            has_trt = True
        except ImportError:
            has_trt = False
        if not (gpu and has_trt and "CUDAExecutionProvider" in ort.get_available_providers()):
            print(
                f"GPU rows skipped: CUDA {'available' if gpu else 'not available'}, "
                f"TensorRT {'installed' if has_trt else 'not installed'}, ORT providers {ort.get_available_providers()}"
            )
            return 0
        gpu_rows(args, Path(tmp), h, w, photos)
    return 0


def gpu_rows(args, tmp: Path, h: int, w: int, photos) -> None:
    """TensorRT fp16 engine vs ONNX Runtime CUDA, same ONNX file, same frames."""
    from densekit.export.onnx import export_onnx
    from densekit.export.trt import build_engine
    from densekit.serve.extractor import OnnxRuntimeBackend, TensorRTBackend, preprocess
    from densekit.serve.loader import load_backbone

    print(
        f"| {'model (GPU)':<28} | {'build s':>8} | {'ORT CUDA ms/frame':>17} | {'TRT fp16 ms/frame':>17} | "
        f"{'TRT/ORT':>7} | {'ORT CUDA fps (b' + str(args.batch) + ')':>18} | "
        f"{'TRT fps (b' + str(args.batch) + ')':>13} |"
    )
    for name in args.models.split(","):
        net = load_backbone(name).eval()
        onnx_path, engine = tmp / f"{name.replace(':', '_')}_gpu.onnx", tmp / f"{name.replace(':', '_')}.engine"
        # static H,W: a timm ViT's dynamic position-embedding Resize is not TensorRT-parsable
        export_onnx(net, onnx_path, static=(h, w), log=lambda _m: None)
        t0 = time.perf_counter()
        build_engine(
            onnx_path,
            engine,
            fp16=True,
            min_shape=f"1x3x{h}x{w}",
            opt_shape=f"1x3x{h}x{w}",
            max_shape=f"{args.batch}x3x{h}x{w}",
            log=lambda _m: None,
        )
        build_s = time.perf_counter() - t0
        trt_runner, ort_runner = TensorRTBackend(engine), OnnxRuntimeBackend(onnx_path, device="cuda")
        one = preprocess([photos[0]], net.meta, (h, w))
        many = preprocess([photos[i % 3] for i in range(args.batch)], net.meta, (h, w))
        t_ort, t_trt = timed(lambda: ort_runner.run(one), args.frames), timed(lambda: trt_runner.run(one), args.frames)
        b_ort, b_trt = (
            timed(lambda: ort_runner.run(many), args.frames),
            timed(lambda: trt_runner.run(many), args.frames),
        )
        print(
            f"| {name:<28} | {build_s:>8.1f} | {1000 * t_ort:>17.2f} | {1000 * t_trt:>17.2f} | {t_trt / t_ort:>7.2f} | "
            f"{args.batch / b_ort:>18.1f} | {args.batch / b_trt:>13.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
