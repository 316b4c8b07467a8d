"""Speed and exactness of densekit's DAVIS J&F evaluator.

Compares, on the same masks:
* densekit.retrieval.davis_eval.evaluate_davis (thread pool, default workers; and workers=1);
* the plain transcription of the official davis2017-evaluation algorithm in
  tests/_davis_reference.py (single process, whole-frame float64 stacks and full-frame
  boundary dilations -- the stand-in for the official evaluator, which runs that way);
* vos-benchmark (hkchengrex, PyPI ``vos-benchmark``; multiprocessing Pool), if installed.

Data: davis2016-mini (../shared/data, GT vs shifted/eroded GT) when present, and a synthetic
DAVIS-2017 set with several objects per sequence. Prints one table: seconds, speed-up over the
plain transcription, and the max abs difference of all metrics (global row, per-object
mean/recall/decay and per-frame J/F vs the transcription; global and per-object J/F means vs
vos-benchmark, which reports only those).

Run: python benchmarks/davis_eval.py [--sequences 8 --frames 40 --objects 3 --workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _davis_reference as ref  # noqa: E402

from densekit.retrieval import davis_eval  # noqa: E402
from densekit.serve.davis import DavisRoot  # noqa: E402

SHARED = Path(os.environ.get("DENSEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
STATS = ("j_mean", "j_recall", "j_decay", "f_mean", "f_recall", "f_decay")


def _timed(fn, repeat: int):  # noqa: ANN001, ANN202
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _diff_vs_reference(res: davis_eval.DavisEvalResult, plain: dict) -> float:
    d = max(abs(res.global_row[c] - plain["global"][c]) for c in davis_eval.GLOBAL_COLUMNS)
    for o in res.objects:
        d = max(d, max(abs(a - b) for a, b in zip([getattr(o, s) for s in STATS], plain["objects"][o.name])))
        pj, pf = plain["frames"][o.name]
        d = max(d, float(np.abs(o.j - pj).max(initial=0)), float(np.abs(o.f - pf).max(initial=0)))
    if set(plain["objects"]) != {o.name for o in res.objects}:
        return float("inf")
    return d


def _run_vos(gt_ids_root: Path, results: Path, workers: int):  # noqa: ANN202
    from vos_benchmark.benchmark import benchmark

    with contextlib.redirect_stdout(io.StringIO()):
        jf, j, f, objs = benchmark([str(gt_ids_root)], [str(results)], num_processes=workers, verbose=False)
    return jf[0] / 100, j[0] / 100, f[0] / 100, objs[0]


def _diff_vs_vos(res: davis_eval.DavisEvalResult, vos) -> float:  # noqa: ANN001
    jf, j, f, objs = vos
    g = res.global_row
    d = max(abs(g["J&F-Mean"] - jf), abs(g["J-Mean"] - j), abs(g["F-Mean"] - f))
    for o in res.objects:
        iou, bf = objs[o.sequence]
        d = max(d, abs(o.j_mean - iou[o.object_id] / 100), abs(o.f_mean - bf[o.object_id] / 100))
    return d


def bench_case(name: str, root: Path, results: Path, binary_gt: bool, workers: int, repeat: int, tmp: Path) -> list[list[str]]:
    davis = DavisRoot(root)
    seqs = davis.sequences(None)
    n_frames = sum(len(davis.annotation_paths(s)) for s in seqs)
    rows = []
    t_ours, res = _timed(lambda: davis_eval.evaluate_davis(root, results, sequences=seqs, workers=workers), repeat)
    t_ours1, res1 = _timed(lambda: davis_eval.evaluate_davis(root, results, sequences=seqs, workers=1), repeat)
    t_plain, plain = _timed(lambda: ref.plain_evaluate_folders(davis.annotations_dir, results, seqs, binary_gt), 1)
    d_plain = max(_diff_vs_reference(res, plain), _diff_vs_reference(res1, plain))
    label = f"{name} ({len(seqs)} seq, {n_frames} frames, {len(res.objects)} obj)"
    rows.append([label, f"densekit (workers={workers})", f"{t_ours:.3f}", f"{t_plain / t_ours:.1f}x", f"{d_plain:.1e}"])
    rows.append(["", "densekit (workers=1)", f"{t_ours1:.3f}", f"{t_plain / t_ours1:.1f}x", f"{d_plain:.1e}"])
    rows.append(["", "plain official transcription", f"{t_plain:.3f}", "1.0x", "ref"])
    try:
        import vos_benchmark  # noqa: F401
    except ImportError:
        rows.append(["", "vos-benchmark", "not installed", "", ""])
        return rows
    # vos-benchmark reads ids straight from the annotation PNGs: give it 0/1 masks for DAVIS-2016.
    gt_ids = tmp / f"{name}-gt-ids"
    for s in seqs:
        gt = davis.read_gt(s)
        for p, m in zip(davis.annotation_paths(s), gt):
            ref.save_ids_png(gt_ids / s / p.name, m)
    t_vos, vos = _timed(lambda: _run_vos(gt_ids, results, workers), repeat)
    rows.append(["", f"vos-benchmark (Pool {workers})", f"{t_vos:.3f}", f"{t_plain / t_vos:.1f}x", f"{_diff_vs_vos(res, vos):.1e}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=8, help="synthetic sequences")
    ap.add_argument("--frames", type=int, default=40, help="frames per synthetic sequence")
    ap.add_argument("--objects", type=int, default=3, help="objects per synthetic sequence")
    ap.add_argument("--workers", type=int, default=davis_eval._resolve_workers(None))
    ap.add_argument("--repeat", type=int, default=2, help="best of N for densekit and vos-benchmark")
    args = ap.parse_args()

    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="densekit-davis-bench-") as td:
        tmp = Path(td)
        mini = SHARED / "davis2016-mini"
        if mini.is_dir():
            rng = np.random.default_rng(0)
            davis = DavisRoot(mini)
            preds, names = {}, {}
            for s in davis.sequences(None):
                preds[s] = ref.perturb(rng, davis.read_gt(s), 1)
                names[s] = [p.stem for p in davis.annotation_paths(s)]
            res_dir = ref.write_results(tmp / "mini-results", preds, names)
            rows += bench_case("davis2016-mini", mini, res_dir, True, args.workers, args.repeat, tmp)
        else:
            rows.append([f"davis2016-mini not found at {mini}", "", "", "", ""])

        rng = np.random.default_rng(1)
        gts = {
            f"synth{i:02d}": ref.blobby_sequence(rng, args.frames, 480, 854, args.objects, always_present=True)
            for i in range(args.sequences)
        }
        root = ref.make_davis2017_root(tmp / "synth", gts)
        # drop=False keeps every object in every scored frame, where vos-benchmark must agree.
        res_dir = ref.write_results(tmp / "synth-results", {s: ref.perturb(rng, g, args.objects, drop=False) for s, g in gts.items()})
        rows += bench_case("synthetic-2017", root, res_dir, False, args.workers, args.repeat, tmp)

    header = ["data", "evaluator", "seconds", "speed-up", "max |diff|"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"cores available: {davis_eval._resolve_workers(None)}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
