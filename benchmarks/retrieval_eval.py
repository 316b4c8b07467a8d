"""Figures table for ``densekit eval retrieval``: both protocols, several backbones, two labelled sets.

Runs the real CLI once per (dataset, backbone) as a subprocess, reads the ``metrics.json`` it writes, and
prints a markdown table: segment-retrieval mIoU, Hummingbird mIoU, pixel accuracy, memory sizes, the
command's wall time and the CPU time it used (user + system of the child), and the command itself.

Datasets: the embedded sample (``densekit data sample``, made in the work folder if missing) and
``../shared/data/voc-mini`` when present (3 images, no ImageSets: a deterministic 2 / 1 split).

Run: python benchmarks/retrieval_eval.py [--work /tmp/reteval/bench] [--backbones pixels,resnet18,efficientnet_lite0]
     [--frame-step 1] [--threads 1] [--extra "--memory-size 200000"]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DENSEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/densekit-retrieval-eval"))
    ap.add_argument("--backbones", default="pixels,resnet18,efficientnet_lite0")
    ap.add_argument("--datasets", default="sample,voc-mini")
    ap.add_argument("--frame-step", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads passed to the CLI")
    ap.add_argument("--extra", default="", help="extra CLI options, e.g. '--memory-size 200000'")
    args = ap.parse_args()

    script = Path(sys.executable).with_name("densekit")
    densekit = [str(script)] if script.is_file() else [sys.executable, "-m", "densekit.apps.cli"]
    args.work.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, Path] = {}
    for name in args.datasets.split(","):
        if name == "sample":
            root = args.work / "sample"
            if not (root / "classes.txt").is_file():
                subprocess.run([*densekit, "data", "sample", str(root)], check=True, capture_output=True)
            datasets[name] = root
        elif name == "voc-mini":
            if (SHARED / "voc-mini").is_dir():
                datasets[name] = SHARED / "voc-mini"
            else:
                print(f"skipping voc-mini: {SHARED / 'voc-mini'} not found", file=sys.stderr)
        else:
            datasets[name] = Path(name)

    rows = []
    for ds_name, root in datasets.items():
        for backbone in args.backbones.split(","):
            out = args.work / f"{ds_name}-{backbone.replace(':', '_').replace('/', '_')}"
            cmd = ["densekit", "eval", "retrieval", str(root), "--backbone", backbone, "--mode", "both", "--out", str(out)]
            if args.frame_step != 1:
                cmd += ["--frame-step", str(args.frame_step)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            cmd += shlex.split(args.extra)
            cpu0, t0 = _children_cpu(), time.perf_counter()
            res = subprocess.run([*densekit, *cmd[1:]], capture_output=True, text=True)
            wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
            if res.returncode != 0:
                print(f"FAILED ({res.returncode}): {shlex.join(cmd)}\n{res.stderr}", file=sys.stderr)
                continue
            m = json.loads((out / "metrics.json").read_text())
            seg, hb = m["modes"]["segments"], m["modes"]["hummingbird"]
            rows.append(
                (ds_name, backbone, m["dataset"]["train_images"], m["dataset"]["val_images"], seg["mIoU"], hb["mIoU"],
                 seg["pixel_accuracy"], hb["pixel_accuracy"], seg["memory_entries"], hb["memory_entries"],
                 m["seconds"]["feature_extraction"], seg["seconds"], hb["seconds"], wall, cpu, shlex.join(cmd))
            )
            print(f"done {ds_name} {backbone}: wall {wall:.0f} s", file=sys.stderr, flush=True)

    print(
        "| data | backbone | train/val img | seg mIoU | hbird mIoU | seg pix acc | hbird pix acc | seg memory | "
        "hbird memory | extract s | seg s | hbird s | wall s | CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]}/{r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | {r[8]} | {r[9]} | "
            f"{r[10]:.1f} | {r[11]:.1f} | {r[12]:.1f} | {r[13]:.0f} | {r[14]:.0f} |"
        )
    print()
    for r in rows:
        print(f"- `{r[15]}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
