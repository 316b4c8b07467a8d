"""Learning evidence for the eight objectives: train on real unlabelled video, score on held-out DAVIS val.

Protocol (issues 12 and 13; every learning claim in densekit is measured this way):

1. **Train** each objective for ``--minutes`` (default 10) of **CPU time** of the training process (``clock
   cpu``: steady on a shared machine; the trainer sizes its cosine schedule to the budget and re-sizes it from
   its own rate at 10 % and 50 %) on ``../shared/data/davis2016-train-videos`` (27 unlabelled mp4 clips of the
   DAVIS-2016 train split, 1,976 frames).

   * ViT family (cribo, detcon, selfpatch, droppos): the CPU config shipped in ``train/configs/
     <objective>_vit_tiny.yaml``, the same 4-block ViT-Tiny/16 at 128 px for all four.
   * CNN family (poodle, hiergroup, densecl, vicregl): resnet18 from scratch, the CPU config
     ``train/configs/<objective>_resnet18.yaml`` (PooDLe builds it with its decoder, as its class asks).

   The configs are what the README's training table runs; ``--set KEY=VALUE`` changes every run.

2. **Score** the exported backbone by J&F of label propagation (``--preset``, default dino, frames at short side
   ``--short-side`` 240) on ``../shared/data/davis2016-val12`` (12 labelled val sequences, 779 frames;
   ``--sequences`` for a subset), beside **random init of the same architecture** and **raw pixels**. For CrIBo
   and DetCon (object-level methods) and their random init also segment-retrieval and Hummingbird mIoU
   (``densekit eval retrieval``) on the embedded sample (``densekit data sample``: the labelled semantic set
   every user has; ``voc-mini`` has 3 images).

3. **Throughput**: training images per CPU-second over the timed steps (the first step, with its start-up,
   left out; a frame pair counts as two images).

An objective "beats random init" when its J&F is above random init of its own architecture.

Each row is a JSON file in ``--out``/rows/, written when it is done and not recomputed when it exists
(``--force`` redoes it): a killed run goes on where it stopped, and two processes with disjoint
``--objectives`` can share one ``--out`` (one core each, ``--threads 1``). ``--report`` prints the table of
what is there.

Run (about 2 h on 2 cores): python benchmarks/train_quality.py --out runs/quality
In two halves at once:      python benchmarks/train_quality.py --out Q --objectives cribo detcon selfpatch droppos &
                            python benchmarks/train_quality.py --out Q --objectives poodle hiergroup densecl vicregl
Table of what is done:      python benchmarks/train_quality.py --out Q --report
Quick check:                python benchmarks/train_quality.py --out Q --minutes 0.3 --sequences dog,libby
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DENSEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIGS = REPO / "train" / "configs"
VIT = ("cribo", "detcon", "selfpatch", "droppos")
CNN = ("poodle", "hiergroup", "densecl", "vicregl")
RETRIEVAL = ("cribo", "detcon")  # object-level methods: their claim is about segments
MAX_STEPS = 10**7  # the budget sets the schedule length; this only bounds it

def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="rows/, runs and results.json go here")
    p.add_argument("--objectives", nargs="*", default=None, help=f"default: all eight ({' '.join(VIT + CNN)})")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per objective, in CPU minutes")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--data", type=Path, default=SHARED / "davis2016-train-videos", help="training videos")
    p.add_argument("--val", type=Path, default=SHARED / "davis2016-val12", help="labelled DAVIS root scored")
    p.add_argument("--sequences", default=None, help="comma-separated val sequences (default: all)")
    p.add_argument("--preset", default="dino", choices=["crw", "dino"])
    p.add_argument("--short-side", type=int, default=240, help="processing short side of the val frames")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no thread spins on the CPU clock)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE for every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="recompute rows that exist")
    p.add_argument("--report", action="store_true", help="only print the table of the rows in --out")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ rows on disk


def _row_path(a: argparse.Namespace, key: str) -> Path:
    return a.out / "rows" / f"{key.replace(' ', '_').replace('/', '_')}.json"


def _have(a: argparse.Namespace, key: str) -> bool:
    return not a.force and _row_path(a, key).is_file()


def _save(a: argparse.Namespace, key: str, row: dict[str, Any]) -> None:
    from densekit.serve.atomic import write_text_atomic

    path = _row_path(a, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, **row}, indent=2, default=str))


def _rows(a: argparse.Namespace) -> list[dict[str, Any]]:
    folder = a.out / "rows"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# ------------------------------------------------------------------------------------------------ the runs


def _config_file(name: str) -> Path:
    """The objective's shipped CPU config (the one its README row runs)."""
    return CONFIGS / f"{name}_{'vit_tiny' if name in VIT else 'resnet18'}.yaml"


def _cfg(a: argparse.Namespace, name: str, out: Path):  # noqa: ANN202 - TrainConfig
    from densekit.train.config import build_config

    ov = [f"budget_s={a.minutes * 60.0}", f"clock={a.clock}", f"max_steps={MAX_STEPS}",
          f"data.num_workers={a.workers}", "progress=false", "tensorboard=false", "save_every=0", "log_every=10",
          f"seed={a.seed}"]
    return build_config(_config_file(name), overrides=ov + list(a.overrides), objective=name, out=str(out),
                        data_path=str(a.data))


def _arch_key(cfg: Any, decoder: bool) -> str:
    """A label of the architecture a config builds (its random init is the baseline of that row)."""
    kw = ",".join(f"{k}={v}" for k, v in sorted(cfg.backbone_kwargs.items()) if k != "drop_path_rate")
    return f"random {cfg.backbone}" + (f"({kw})" if kw else "") + (" +decoder" if decoder else "")


def _decoder(cfg: Any) -> bool:
    from densekit.train.trainer import available_objectives

    return bool(cfg.decoder if cfg.decoder is not None else getattr(available_objectives()[cfg.objective],
                                                                    "backbone_decoder", False))


class _Clock:
    """Trainer hook: the budget clock after each step (steady throughput, first step left out)."""

    def __init__(self, kind: str) -> None:
        from densekit.train.budget import clock_fn

        self.now, self.times = clock_fn(kind), []

    def __call__(self, _trainer: object, _step: int) -> None:
        self.times.append(self.now())

    def per_second(self, batch: int) -> float | None:
        return (len(self.times) - 1) * batch / (self.times[-1] - self.times[0]) if len(self.times) > 2 else None


def _score(a: argparse.Namespace, backbone: Any, retrieval: bool) -> dict[str, Any]:
    from densekit.retrieval.backbone_eval import davis_jf

    t0 = time.perf_counter()
    seqs = a.sequences.split(",") if a.sequences else None
    out: dict[str, Any] = dict(davis_jf(backbone, a.val, sequences=seqs, preset=a.preset, short_side=a.short_side))
    out["eval_s"] = time.perf_counter() - t0
    if retrieval:
        out.update(_retrieval(a, backbone))
    return out


def _retrieval(a: argparse.Namespace, backbone: Any) -> dict[str, float]:
    from densekit.retrieval.retrieval_eval import evaluate_retrieval
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.sample import make_sample

    sample = make_sample(a.out / "sample", seed=a.seed)
    report = evaluate_retrieval(sample, FeatureExtractor(backbone, device="cpu"))
    return {f"{m} mIoU": r.miou for m, r in report.modes.items()}


def _train(a: argparse.Namespace, name: str) -> dict[str, Any]:
    from densekit.serve.checkpoint import load_checkpoint
    from densekit.train.trainer import Trainer, available_objectives

    run = a.out / f"run-{name}"
    cfg = _cfg(a, name, run)
    clock = _Clock(a.clock)
    res = Trainer(cfg, hooks=[clock]).fit()
    per_sample = 2 if available_objectives()[name].data == "pairs" else 1
    ips = clock.per_second(cfg.batch_size * per_sample)
    row = {"model": name, "arch": _arch_key(cfg, _decoder(cfg)), "config": _config_file(name).name,
           "steps": res.step, "schedule_steps": res.max_steps, "budget_used_s": res.seconds, "clock": a.clock,
           "wall_s": res.wall_s, "images_per_cpu_s" if a.clock == "cpu" else "images_per_s": ips,
           "final_loss": res.metrics.get("loss"), "stopped_by_budget": res.stopped_by_budget}
    bb = load_checkpoint(run / "backbone.safetensors")
    row.update(_score(a, bb, name in RETRIEVAL))
    return row


def _baseline(a: argparse.Namespace, name: str) -> tuple[str, Any]:
    """(row key, random init of ``name``'s architecture with the seed of its run)."""
    from densekit.serve.backbones import build_backbone

    cfg = _cfg(a, name, a.out / "unused")
    dec = _decoder(cfg)
    return _arch_key(cfg, dec), build_backbone(cfg.backbone, seed=a.seed, decoder=dec,
                                               kwargs=cfg.backbone_kwargs or None)


# ------------------------------------------------------------------------------------------------ the table


def _short(label: str) -> str:
    return label.replace("random ", "").replace("timm:vit_tiny_patch16_224", "ViT-Tiny/16")


def _table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each architecture's random init, then the objectives trained on it; pixels first."""
    order = {n: i for i, n in enumerate(VIT + CNN)}
    rows = sorted(rows, key=lambda r: (r["arch"] != "pixels", r["arch"], not r.get("baseline"),
                                       order.get(r["model"], 99)))
    base = {r["arch"]: r for r in rows if r.get("baseline")}
    pixels = base.get("pixels", {}).get("J&F")
    lines = ["| model | steps | images/CPU-s | J&F | J | F | segments mIoU | hummingbird mIoU | > random init "
             "| > pixels |", "|" + "---|" * 10]
    for r in rows:
        ips = r.get("images_per_cpu_s")
        f = lambda k: f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-"  # noqa: E731
        b = base.get(r["arch"])
        vs_random = "" if r.get("baseline") or b is None else ("yes" if r["J&F"] > b["J&F"] else "NO")
        vs_pixels = "" if r.get("baseline") or pixels is None else ("yes" if r["J&F"] > pixels else "NO")
        if r.get("baseline"):
            name = "pixels" if r["arch"] == "pixels" else f"random init {_short(r['arch'])}"
        else:
            name = f"{r['model']} ({_short(r['arch'])})"
        lines.append(f"| {name} | {r['steps']} | {f'{ips:.2f}' if ips else '-'} | {f('J&F')} | {f('J')} | {f('F')} "
                     f"| {f('segments mIoU')} | {f('hummingbird mIoU')} | {vs_random} | {vs_pixels} |")
    return "\n".join(lines)


def _machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("Flags")), [])
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(wanted)}"


def main() -> int:
    a = _args()
    names = a.objectives if a.objectives is not None else list(VIT + CNN)
    unknown = [n for n in names if n not in VIT + CNN]
    if unknown:
        print(f"error: unknown objective(s) {unknown}; choose from {' '.join(VIT + CNN)}", file=sys.stderr)
        return 2
    if not a.report:
        for root in (a.data, a.val):
            if not root.exists():
                print(f"error: {root} not found (set DENSEKIT_SHARED_DATA or --data/--val)", file=sys.stderr)
                return 2
        import torch

        torch.set_num_threads(max(1, a.threads))
        _run_all(a, names)
    rows = _rows(a)
    print(f"\n{a.minutes} {a.clock}-minutes per objective; train {a.data.name}, J&F ({a.preset}, short side "
          f"{a.short_side}) on {a.val.name}; machine: {_machine()}\n")
    print(_table(rows))
    from densekit.serve.atomic import write_text_atomic

    write_text_atomic(a.out / "results.json", json.dumps({"machine": _machine(), "rows": rows}, indent=2))
    return 0


def _run_all(a: argparse.Namespace, names: list[str]) -> None:
    from densekit.serve.backbones import build_backbone

    for name in names:  # baselines first: a short run then still says where the floor is
        key, bb = _baseline(a, name)
        if not _have(a, key):
            row = {"model": key, "arch": key, "baseline": True, "steps": 0, **_score(a, bb, name in RETRIEVAL)}
            _save(a, key, row)
            print(f"{key}: J&F {row['J&F']:.4f}", flush=True)
    if not _have(a, "pixels"):
        row = {"model": "pixels", "arch": "pixels", "baseline": True, "steps": 0,
               **_score(a, build_backbone("pixels"), False)}
        _save(a, "pixels", row)
        print(f"pixels: J&F {row['J&F']:.4f}", flush=True)
    for name in names:
        if _have(a, name):
            continue
        row = _train(a, name)
        _save(a, name, row)
        print(f"{name}: {row['steps']} steps in {row['budget_used_s']:.0f} {a.clock}-s, J&F {row['J&F']:.4f}",
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
