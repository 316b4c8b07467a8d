"""Learning evidence: train every objective for the same wall-clock budget, then J&F by label propagation.

For each objective in ``densekit.train.objectives.OBJECTIVES`` (or ``--objectives``):

1. make the sample dataset (``densekit.serve.sample.make_sample``; its ``train`` split trains, its ``val``
   split is held out for evaluation);
2. train with :class:`densekit.train.trainer.Trainer` for ``--minutes`` through the trainer's own time budget
   (``budget_s``, ``clock``: it times a few steps, sizes the cosine schedule to end with the budget and stops
   when the budget is spent; model building and the calibration steps count). ``--clock wall`` (default)
   counts wall time; ``--clock cpu`` counts the CPU time of the training process and its DataLoader workers,
   which stays fair when other work shares the machine (use it with ``--threads 1``, so that no thread spins);
   heads and sizes are the per-objective ``CPU_HPARAMS`` below unless ``--paper-hparams``; ``--backbone``,
   default resnet18; PooDLe builds it with the spatial decoder, as its class asks;
3. J&F (``--preset``, default crw) of the exported backbone on the held-out sample sequences and on
   ``../shared/data/davis2016-mini`` when present (frames resized to ``--davis-short-side`` for CPU time).

Baselines under the same protocol: random-init ``--backbone`` (with and without the decoder when an objective
uses it) and ``pixels``. An objective "beats random init" when its J&F is higher than random init of the SAME
architecture on both sets. Throughput is training samples per second (a pair counts as one sample) measured
over the timed run.

Run (full, ~10 min per objective): python benchmarks/train_quality.py
On a shared machine:               python benchmarks/train_quality.py --clock cpu --threads 1 --workers 0
Quick check:                    python benchmarks/train_quality.py --minutes 0.3 --sequences 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DENSEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MAX_STEPS = 10**7  # the trainer's budget sets the schedule length; this only bounds it


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per objective, in minutes of --clock")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="budget in wall-clock time, or in CPU time of the training process and its workers (fair on a "
                        "shared machine)")
    p.add_argument("--paper-hparams", action="store_true", help="the papers' head sizes instead of CPU_HPARAMS")
    p.add_argument("--objectives", nargs="*", default=None, help="default: all of OBJECTIVES")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--sequences", type=int, default=8, help="sample videos (train + held-out val split)")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=432)
    p.add_argument("--size", type=int, default=128, help="training crop side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="override optim.lr (default: the trainer's)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--preset", default="crw", choices=["crw", "dino"])
    p.add_argument("--davis", type=Path, default=SHARED / "davis2016-mini")
    p.add_argument("--davis-short-side", type=int, default=240)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra KEY=VALUE trainer override for every objective (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="keep runs and results.json here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# The papers' heads are sized for GPU clusters; on 2 CPU cores they eat the whole budget in a few steps
# (VICRegL's 8192-wide expander alone is ~136M parameters). These keep each method's losses and structure and
# shrink only widths, queue length, crop sizes and DenseCL's dense-loss warm-up (1000 iterations in the paper,
# longer than a CPU budget, so the dense term would never switch on).
CPU_HPARAMS: dict[str, list[str]] = {
    "densecl": ["hparams.queue_len=4096", "hparams.crop_size=128", "hparams.warmup_iters=20"],
    "poodle": ["hparams.hidden_dim=512", "hparams.subcrop_size=96", "hparams.loss_stride=4"],
    "vicregl": ["hparams.mlp=2048-2048-2048"],
    "hiergroup": [],
}


class _Clock:
    """Trainer hook recording the time after each step on the budget's clock (for the steady-state throughput)."""

    def __init__(self, kind: str = "wall") -> None:
        from densekit.train.budget import clock_fn

        self.now = clock_fn(kind)
        self.times: list[float] = []

    def __call__(self, _trainer: object, _step: int) -> None:
        self.times.append(self.now())


def _cfg(a: argparse.Namespace, name: str, data: Path, out: Path, extra: list[str]):  # noqa: ANN202
    from densekit.train.config import build_config

    ov = [f"budget_s={a.minutes * 60.0}", f"clock={a.clock}", f"max_steps={MAX_STEPS}", f"batch_size={a.batch_size}",
          f"data.size=[{a.size},{a.size}]", "data.split=train", f"data.num_workers={a.workers}", "progress=false",
          "tensorboard=false", "save_every=0", "log_every=10", f"seed={a.seed}", "optim.warmup_steps=-1"]
    if a.lr is not None:
        ov.append(f"optim.lr={a.lr}")
    return build_config(overrides=ov + list(a.overrides) + extra, objective=name, backbone=a.backbone,
                        out=str(out), data_path=str(data))


def _jf(backbone, root: Path, sequences, a: argparse.Namespace, short_side: int) -> float:  # noqa: ANN001
    from densekit.retrieval.backbone_eval import davis_jf

    return davis_jf(backbone, root, sequences=sequences, preset=a.preset, short_side=short_side)["J&F"]


def main() -> int:
    a = _args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from densekit.serve.backbones import build_backbone
    from densekit.serve.checkpoint import load_checkpoint
    from densekit.serve.davis import DavisRoot
    from densekit.serve.sample import make_sample
    from densekit.train.trainer import Trainer, available_objectives

    table = available_objectives()
    names = a.objectives or sorted(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown objective(s) {unknown}; available: {sorted(table)}", file=sys.stderr)
        return 2
    work = a.out or Path(tempfile.mkdtemp(prefix="densekit-train-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    sample = make_sample(work / "sample", sequences=max(2, a.sequences), frames=a.frames, height=a.height,
                         width=a.width, seed=a.seed)
    val = DavisRoot(sample).sequences("val")
    davis = a.davis if (a.davis / "JPEGImages").is_dir() else None
    davis_seqs = DavisRoot(davis).sequences() if davis else None
    print(f"sample: {sample} (train {len(DavisRoot(sample).sequences('train'))}, held-out val {val}); "
          f"davis2016-mini: {davis or 'absent'}; budget {a.minutes} min/objective; preset {a.preset}", flush=True)

    def evaluate(bb) -> tuple[float, float | None]:  # noqa: ANN001
        s = _jf(bb, sample, val, a, 0)
        d = _jf(bb, davis, davis_seqs, a, a.davis_short_side) if davis else None
        return s, d

    rows: list[dict] = []
    decoders = {bool(getattr(table[n], "backbone_decoder", False)) for n in names}
    for dec in sorted(decoders):
        label = f"random {a.backbone}" + (" +decoder" if dec else "")
        t0 = time.perf_counter()
        s, d = evaluate(build_backbone(a.backbone, seed=a.seed, decoder=dec))
        rows.append({"model": label, "arch": (a.backbone, dec), "sample": s, "davis": d, "steps": 0, "ips": None,
                     "eval_s": time.perf_counter() - t0})
        print(f"{label}: sample J&F {s:.4f}" + (f", davis J&F {d:.4f}" if d is not None else ""), flush=True)
    s, d = evaluate(build_backbone("pixels"))
    rows.append({"model": "pixels", "arch": ("pixels", False), "sample": s, "davis": d, "steps": 0, "ips": None})
    print(f"pixels: sample J&F {s:.4f}" + (f", davis J&F {d:.4f}" if d is not None else ""), flush=True)

    for name in names:
        dec = bool(getattr(table[name], "backbone_decoder", False))
        hp = [] if a.paper_hparams else CPU_HPARAMS.get(name, [])
        clock = _Clock(a.clock)
        c0 = clock.now()
        res = Trainer(_cfg(a, name, sample, work / f"run-{name}", hp), hooks=[clock]).fit()
        steps, train_s, budget_used = res.step, res.wall_s, res.seconds
        if len(clock.times) > 1:  # steady state: first step (start-up, worker spawn) excluded
            ips = (len(clock.times) - 1) * a.batch_size / max(clock.times[-1] - clock.times[0], 1e-9)
        else:
            ips = a.batch_size / max(clock.times[0] - c0, 1e-9) if clock.times else 0.0
        bb = load_checkpoint(work / f"run-{name}" / "backbone.safetensors")
        s, d = evaluate(bb)
        rows.append({"model": name, "arch": (a.backbone, dec), "sample": s, "davis": d, "steps": steps, "ips": ips,
                     "train_s": train_s, "budget_used_s": budget_used, "schedule_steps": res.max_steps,
                     "seconds_per_step": res.seconds_per_step, "stopped_by_budget": res.stopped_by_budget,
                     "hparams": hp, "final_loss": res.metrics.get("loss")})
        print(f"{name} {' '.join(hp)}: {steps} of {res.max_steps} scheduled steps in {budget_used:.0f} {a.clock}-s "
              f"({train_s:.0f} s wall, "
              f"{ips:.2f} samples per {a.clock}-s), loss {res.metrics.get('loss')}, "
              f"sample J&F {s:.4f}" + (f", davis J&F {d:.4f}" if d is not None else ""), flush=True)

    random_by_arch = {r["arch"]: r for r in rows if r["model"].startswith("random")}
    print()
    head = f"{'model':<26}{'steps':>7}{'samples/s' if a.clock == 'wall' else 'samples/cpu-s':>14}{'J&F sample-val':>16}{'J&F davis16-mini':>18}  beats random init"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = random_by_arch.get(r["arch"])
        verdict = ""
        if r["steps"] and base is not None:
            wins = [r["sample"] > base["sample"]] + ([r["davis"] > base["davis"]] if r["davis"] is not None else [])
            verdict = "yes" if all(wins) else ("partly" if any(wins) else "NO")
        dav = f"{r['davis']:.4f}" if r["davis"] is not None else "-"
        ips = f"{r['ips']:.2f}" if r["ips"] else "-"
        print(f"{r['model']:<26}{r['steps']:>7}{ips:>14}{r['sample']:>16.4f}{dav:>18}  {verdict}")
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "rows": rows}
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nruns and results.json in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
