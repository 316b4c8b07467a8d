"""``densekit demo``: the main job on the embedded default, end to end, as one resumable function.

:func:`run_demo` runs six steps into one folder ``OUT`` and ends with the command that opens the app on
the results:

1. **sample**: the embedded sample dataset (:func:`densekit.serve.sample.make_sample`) in ``OUT/sample``;
2. **train**: a short self-supervised run (:class:`densekit.train.trainer.Trainer`) in ``OUT/train`` under the
   trainer's own budget (``budget_s``; CPU seconds of the process by default, ``clock="wall"`` for the wall
   clock, as ``densekit train --minutes``): it times a few steps, sizes the cosine schedule to end with
   ``minutes``, re-plans it from the loop's own rate, stops when they are spent and exports the backbone.
   By default it *fine-tunes* the ImageNet-pretrained EfficientNet-Lite0 with the shipped recipe
   ``train/configs/hiergroup_finetune_lite0.yaml`` (stem and first two stages frozen, the rest at a tenth of
   the heads' rate): what an engineer with their own footage starts from, and the model to beat; any other
   ``backbone`` (``resnet18``, a checkpoint) is trained as given, from scratch for a bare architecture;
3. **export**: ONNX export of the trained backbone with its parity check
   (:func:`densekit.export.onnx.export_onnx`), and a TensorRT engine where TensorRT and a GPU exist;
4. **eval**: DAVIS J&F on the sample's held-out ``val`` split of the trained model (run through its ONNX file
   with ONNX Runtime), the ImageNet-pretrained EfficientNet-Lite0, and two baselines: random init of the
   trained architecture (same seed as the run's start) and raw pixels, each by
   :func:`densekit.retrieval.davis_protocol.score_davis` (the protocol of ``densekit eval davis``; the dino
   preset at the frames' own short side, for CPU time);
5. **index**: a :class:`~densekit.retrieval.segment_index.SegmentIndex` of the sample frames with the best
   model of step 4 (trained or pretrained: the baselines are references, not candidates) and one search by
   a point on a known object of a held-out frame, scored by the class of each hit;
6. **report**: ``OUT/report.md`` with relative links to PNGs in ``OUT/report/`` and ``OUT/search/``
   (:mod:`densekit.apps.demo_report`).

Resumable: ``OUT/demo.json`` records, per step, a fingerprint of its inputs (options and the completion
time of the steps it depends on), its timings and its results. A step whose fingerprint matches and whose
outputs exist is skipped; a step whose inputs changed runs again, and so do the steps after it. A training
run interrupted part-way resumes from its last state checkpoint (``Trainer(resume=True)``). ``force=True``
redoes everything. Every file is written atomically (:mod:`densekit.serve.atomic`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.apps.demo_report import (
    fmt_seconds,
    last_logged_loss,
    preset_text,
    report_markdown,
    write_png,
    write_report_images,
)
from densekit.apps.demo_report import rel as _rel
from densekit.serve.atomic import write_text_atomic
from densekit.serve.errors import DensekitError

Log = Callable[[str], None]

MANIFEST = "demo.json"
LOCK = "demo.lock"
GENERATOR = "densekit.apps.demo"
FORMAT = 1
STEPS = ("sample", "train", "export", "eval", "index", "report")
PRETRAINED = "efficientnet_lite0"
TRT_SKIPPED = "skipped: no TensorRT/GPU"
#: the default objective and start: hierarchical grouping fine-tuning the pretrained Lite0 (the recipe that beat
#: its start on davis2016-val12, README "Fine-tuning"); hiergroup is also the objective that learned most from
#: scratch in benchmarks/train_quality.py
DEFAULT_OBJECTIVE = "hiergroup"
DEFAULT_BACKBONE = PRETRAINED
#: the shipped config whose fine-tuning settings the demo uses when it starts from the pretrained Lite0
FINETUNE_RECIPE = "hiergroup_finetune_lite0"
CLOCKS = ("cpu", "wall")
#: with a time budget the trainer sets the schedule length itself; this only bounds it
MAX_BUDGET_STEPS = 10**6
BUDGET_SAVE_EVERY = 50  # steps between state checkpoints of a budget run (what an interruption can lose)


@dataclass(frozen=True)
class SampleSpec:
    """Size of the sample dataset."""

    sequences: int
    frames: int
    height: int
    width: int


@dataclass(frozen=True)
class TrainSpec:
    """Training settings; ``steps`` fixed (fast mode) or None (time budget)."""

    size: int
    batch_size: int
    workers: int
    steps: int | None


# The sample of `densekit data sample` and the settings of benchmarks/train_quality.py (crop 128, batch 8,
# one loader worker); fast mode: the smallest sample make_sample accepts that still has a held-out split.
FULL_SAMPLE = SampleSpec(sequences=6, frames=24, height=240, width=432)
FAST_SAMPLE = SampleSpec(sequences=3, frames=8, height=96, width=160)
FULL_TRAIN = TrainSpec(size=128, batch_size=8, workers=1, steps=None)
# The sample's frames are small (240x432) and its minutes few: crops of 128 give about twice the steps of the
# recipe's 160, and a third of its learning rate keeps them from drifting off the start. Measured on the sample's
# val split (3 CPU-minutes, J&F dino; pretrained 0.5756): 160/1e-3 0.5759, 128/1e-3 0.5781, 160/3e-4 0.5772,
# 128/3e-4 0.5821, 160/3e-3 0.5742; freezing through blocks.2 0.5718.
FINETUNE_TRAIN = TrainSpec(size=128, batch_size=8, workers=1, steps=None)
FINETUNE_LR = 3e-4
FAST_TRAIN = TrainSpec(size=64, batch_size=2, workers=0, steps=3)


@dataclass(frozen=True)
class DemoOptions:
    """What ``densekit demo`` was asked to do (see :func:`run_demo`)."""

    out: Path = Path("runs/demo")
    minutes: float = 3.0
    clock: str = "cpu"
    objective: str = DEFAULT_OBJECTIVE
    backbone: str = DEFAULT_BACKBONE
    fast: bool = False
    force: bool = False
    preset: str = "dino"
    seed: int = 0

    @property
    def sample_spec(self) -> SampleSpec:
        return FAST_SAMPLE if self.fast else FULL_SAMPLE

    @property
    def finetune(self) -> bool:
        """True when training starts from the pretrained Lite0 and uses the fine-tuning recipe."""
        return self.backbone == PRETRAINED

    @property
    def train_spec(self) -> TrainSpec:
        if self.fast:
            return FAST_TRAIN
        return FINETUNE_TRAIN if self.finetune else FULL_TRAIN


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: where things are, the J&F rows, and what ran or was skipped."""

    out: Path
    report: Path
    app_command: str
    jf: list[dict[str, Any]]
    best: str
    seconds: float
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _backbone_label(backbone: str) -> str:
    return Path(backbone).stem if backbone.lower().endswith(".safetensors") else backbone


def validate_options(opts: DemoOptions) -> None:
    """Bad options -> DensekitError (one line) before anything is written."""
    if not isinstance(opts.minutes, (int, float)) or not math.isfinite(opts.minutes) or opts.minutes <= 0:
        raise DensekitError(f"--minutes must be a positive number, got {opts.minutes}")
    if opts.clock not in CLOCKS:
        raise DensekitError(f"--clock must be cpu or wall, got {opts.clock!r}")
    if opts.preset not in ("crw", "dino"):
        raise DensekitError(f"unknown preset {opts.preset!r}; choose crw or dino")
    from densekit.train.trainer import get_objective_class

    get_objective_class(opts.objective)  # unknown name -> one line listing the known ones
    if opts.backbone.lower().endswith(".safetensors"):
        if not Path(opts.backbone).is_file():
            raise DensekitError(f"--backbone {opts.backbone}: file not found")
    else:
        from densekit.serve.backbones import default_arch

        default_arch(opts.backbone)
        if opts.backbone == "pixels":
            raise DensekitError("--backbone pixels has no weights to train; choose resnet18, resnet50 or efficientnet_lite0")


def prepare_out(out: Path) -> bool:
    """Create ``out`` (or accept a previous demo there) and check it is writable; True when resuming.

    Raises:
        DensekitError: ``out`` is a file, a non-empty folder without a demo manifest, or not writable.
    """
    import tempfile

    if out.exists() and not out.is_dir():
        raise DensekitError(f"--out {out} exists and is not a folder")
    resuming = (out / MANIFEST).is_file()
    if out.is_dir() and not resuming and any(p.name != LOCK for p in out.iterdir()):
        raise DensekitError(f"--out {out} is not empty and holds no densekit demo ({MANIFEST}); choose an empty or new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DensekitError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return resuming


class Manifest:
    """``OUT/demo.json``: per step ``{fingerprint, done, seconds, finished, result}``; written atomically."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST
        self.data: dict[str, Any] = {"generator": GENERATOR, "format": FORMAT, "steps": {}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DensekitError(f"{self.path} is not a readable demo manifest ({exc}); remove it or use --force") from None
            if not isinstance(data, dict) or data.get("generator") != GENERATOR:
                raise DensekitError(f"{self.path} was not written by densekit demo; choose another --out")
            if data.get("format") == FORMAT and isinstance(data.get("steps"), dict):
                self.data = data

    def get(self, name: str) -> dict[str, Any] | None:
        return self.data["steps"].get(name)

    def put(self, name: str, entry: dict[str, Any]) -> None:
        self.data["steps"][name] = entry
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------


class _Demo:
    """Holds the options, the manifest and the printing; one method per step."""

    def __init__(self, opts: DemoOptions, log: Log) -> None:
        self.opts = opts
        self.out = opts.out
        self.log = log
        self.manifest = Manifest(opts.out)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.label = f"{opts.objective} {_backbone_label(opts.backbone)}"
        self.trained_key = "trained"

    # -- paths -----------------------------------------------------------------------------------------

    @property
    def sample_dir(self) -> Path:
        return self.out / "sample"

    @property
    def train_dir(self) -> Path:
        return self.out / "train"

    @property
    def index_dir(self) -> Path:
        return self.out / "index"

    def onnx_path(self, key: str) -> Path:
        name = "-".join(self.label.split()) if key == self.trained_key else key
        return self.out / "export" / name / "model.onnx"

    def eval_dir(self, key: str) -> Path:
        return self.out / "eval" / key

    # -- step bookkeeping ------------------------------------------------------------------------------

    def finished(self, name: str) -> float:
        entry = self.manifest.get(name)
        return float(entry["finished"]) if entry and entry.get("done") else 0.0

    def cached(self, name: str, inputs: dict[str, Any], outputs: list[Path]) -> dict[str, Any] | None:
        """The manifest entry of ``name`` when it is done with these inputs and its outputs exist."""
        entry = self.manifest.get(name)
        if self.opts.force or not entry or not entry.get("done") or entry.get("fingerprint") != _hash(inputs):
            return None
        if not all(p.exists() for p in outputs):
            return None
        return entry

    def record(
        self, name: str, inputs: dict[str, Any], seconds: float, result: dict[str, Any], cpu: float | None = None
    ) -> dict[str, Any]:
        entry = {"fingerprint": _hash(inputs), "done": True, "seconds": seconds, "cpu_seconds": cpu,
                 "finished": time.time(), "result": result}
        self.manifest.put(name, entry)
        return entry

    def run_step(
        self, number: int, name: str, title: str, inputs: dict[str, Any], outputs: list[Path],
        body: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """Print the header, skip when cached, otherwise run ``body`` and record its result."""
        head = f"[{number}/{len(STEPS)}] {title}"
        entry = self.cached(name, inputs, outputs)
        if entry is not None:
            self.log(f"{head}: skipped, done in an earlier run ({fmt_seconds(entry['seconds'])})")
            self.skipped.append(name)
            return entry["result"]
        self.log(f"{head} ...")
        t0, c0 = time.perf_counter(), time.process_time()
        result = body()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.record(name, inputs, seconds, result, cpu)
        self.ran.append(name)
        self.log(f"      done in {fmt_seconds(seconds)} (CPU time of this process {fmt_seconds(cpu)})")
        return result

    def sub(self, text: str) -> None:
        self.log(f"      {text}")

    # -- 1. sample -------------------------------------------------------------------------------------

    def step_sample(self) -> dict[str, Any]:
        spec = self.opts.sample_spec
        inputs = {"spec": asdict(spec), "seed": self.opts.seed}

        def body() -> dict[str, Any]:
            from densekit.serve.davis import DavisRoot
            from densekit.serve.sample import make_sample

            self.sub(f"{spec.sequences} sequences x {spec.frames} frames at {spec.width}x{spec.height} -> {self.sample_dir}")
            make_sample(self.sample_dir, sequences=spec.sequences, frames=spec.frames, height=spec.height,
                        width=spec.width, seed=self.opts.seed)
            davis = DavisRoot(self.sample_dir)
            return {"train": davis.sequences("train"), "val": davis.sequences("val")}

        return self.run_step(1, "sample", f"sample data -> {self.sample_dir}", inputs,
                             [self.sample_dir / "sample.json"], body)

    # -- 2. train --------------------------------------------------------------------------------------

    def _train_config(self, out: Path):
        from densekit.train.config import build_config

        t = self.opts.train_spec
        if t.steps is not None:  # --fast: a fixed number of steps
            length = [f"max_steps={t.steps}", "budget_s=0", f"save_every={max(1, t.steps // 5)}", "log_every=1"]
        else:
            length = [f"budget_s={self.opts.minutes * 60.0}", f"clock={self.opts.clock}", f"max_steps={MAX_BUDGET_STEPS}",
                      f"save_every={BUDGET_SAVE_EVERY}", "log_every=10"]
        overrides = length + [
            f"batch_size={t.batch_size}", f"data.size=[{t.size},{t.size}]", "data.split=train",
            f"data.num_workers={t.workers}", "progress=true", "tensorboard=false", f"seed={self.opts.seed}",
            "optim.warmup_steps=-1", "device=cpu",
        ]
        # the recipe's fine-tuning settings (freeze, learning rates); the demo's own length, data and size win
        recipe = FINETUNE_RECIPE if self.opts.finetune else None
        if recipe is not None and t.steps is None:
            overrides.append(f"optim.lr={FINETUNE_LR}")
        return build_config(recipe, overrides=overrides, objective=self.opts.objective, backbone=self.opts.backbone,
                            out=str(out), data_path=str(self.sample_dir))

    def step_train(self, sample: dict[str, Any]) -> dict[str, Any]:
        opts = self.opts
        budget = None if opts.fast else opts.minutes
        inputs = {"sample": self.finished("sample"), "objective": opts.objective, "backbone": opts.backbone,
                  "minutes": budget, "clock": opts.clock, "finetune": opts.finetune, "spec": asdict(opts.train_spec),
                  "seed": opts.seed}
        backbone_file = self.train_dir / "backbone.safetensors"
        verb = "fine-tune the pretrained" if opts.finetune else "train"
        title = f"{verb} {_backbone_label(opts.backbone)} with {opts.objective} " + (
            f"for {opts.train_spec.steps} steps (--fast)" if opts.fast else f"for {opts.minutes:g} min ({clock_text(opts.clock)})"
        )

        def body() -> dict[str, Any]:
            from densekit.train.trainer import STATE_FILE, Trainer

            fp = _hash(inputs)
            partial = self.manifest.get("train:partial")
            resume = (not opts.force and partial is not None and partial.get("fingerprint") == fp
                      and (self.train_dir / STATE_FILE).is_file())
            if resume:
                self.sub(f"resuming the interrupted run in {self.train_dir} (its schedule and the budget left)")
            else:
                shutil.rmtree(self.train_dir, ignore_errors=True)
                self.manifest.put("train:partial", {"fingerprint": fp, "done": False})
                if budget is not None:
                    self.sub("the trainer times a few steps, then sizes its schedule to end with the budget")
            res = Trainer(self._train_config(self.train_dir), resume=resume).fit()
            if not backbone_file.is_file():
                raise DensekitError(f"training ended without {backbone_file}")
            loss = res.metrics.get("loss")
            if loss is None:
                loss = last_logged_loss(self.train_dir / "log.jsonl")
            if res.seconds_per_step:
                self.sub(f"{res.seconds_per_step:.2f} s/step -> {res.max_steps} steps scheduled for {opts.minutes:g} min")
            if res.stopped_by_budget:
                self.sub(f"the budget ran out at step {res.step} of {res.max_steps}" + (
                    ": building the model and the trainer's timing steps took all of it; give more --minutes"
                    if res.step == 0 else ""))
            self.sub(f"{res.step} steps, {res.images_per_s:.2f} samples/s"
                     + (f", last loss {loss:.4f}" if loss is not None else ""))
            if budget is not None:
                self.sub(f"used {res.seconds:.0f} s of {clock_text(res.clock)} of the {res.budget_s:.0f} s budget "
                         f"({res.wall_s:.0f} s wall)")
            return {"steps": res.step, "max_steps": res.max_steps, "samples_per_s": res.images_per_s, "loss": loss,
                    "train_seconds": res.wall_s, "clock": res.clock, "budget_seconds": res.seconds,
                    "seconds_per_step": res.seconds_per_step, "resumed": resume,
                    "batch_size": opts.train_spec.batch_size, "crop": opts.train_spec.size,
                    "stopped_by_budget": res.stopped_by_budget}

        return self.run_step(2, "train", title, inputs, [backbone_file], body)

    # -- 3. export -------------------------------------------------------------------------------------

    def _export(self, model: str, dest: Path) -> dict[str, Any]:
        from densekit.export.onnx import export_onnx

        report = export_onnx(model, dest, log=self.sub)
        return {
            "onnx": _rel(dest, self.out),
            "exporter": report.exporter,
            "opset": report.opset,
            "parity": [{"size": list(r.size), "batch": r.batch, "max_abs": r.max_abs, "cosine": r.cosine,
                        "min_location_cosine": r.min_location_cosine} for r in report.parity],
            "trt_parser_issues": report.trt_issues,
            "export_seconds": report.seconds,
        }

    def _tensorrt(self, onnx_path: Path) -> dict[str, Any]:
        status = tensorrt_unavailable()
        if status is not None:
            self.sub(f"TensorRT: {status}")
            return {"status": status}
        from densekit.export.trt import build_engine

        engine = onnx_path.with_suffix(".engine")
        try:
            rep = build_engine(onnx_path, engine, fp16=True, log=self.sub)
        except DensekitError as exc:  # optional: the demo goes on with the ONNX model
            self.sub(f"TensorRT: failed: {exc}")
            return {"status": f"failed: {exc}"}
        status = f"built {_rel(engine, self.out)} ({rep.plan.precision}, TensorRT {rep.info.tensorrt_version})"
        self.sub(f"TensorRT: {status}")
        return {"status": status, "engine": _rel(engine, self.out),
                "parity": [list(map(float, p[2:])) for p in rep.parity]}

    def step_export(self) -> dict[str, Any]:
        dest = self.onnx_path(self.trained_key)
        inputs = {"train": self.finished("train")}

        def body() -> dict[str, Any]:
            shutil.rmtree(dest.parent, ignore_errors=True)
            result = self._export(str(self.train_dir / "backbone.safetensors"), dest)
            result["tensorrt"] = self._tensorrt(dest)
            return result

        return self.run_step(3, "export", f"export ONNX -> {dest}", inputs, [dest], body)

    # -- 4. eval ---------------------------------------------------------------------------------------

    def models(self) -> list[tuple[str, str]]:
        """(key, label) of the evaluated models, in table order."""
        done = "fine-tuned" if self.opts.finetune else "trained"
        start = ", the start" if self.opts.finetune else ""
        return [
            (self.trained_key, f"{self.label} ({done}, ONNX)"),
            (PRETRAINED, f"efficientnet_lite0 (ImageNet-pretrained{start})"),
            ("random", f"{_backbone_label(self.opts.backbone)} random init"),
            ("pixels", "pixels"),
        ]

    def _extractor(self, key: str):
        from densekit.serve.extractor import FeatureExtractor

        if key == self.trained_key:
            return FeatureExtractor(self.onnx_path(key), device="cpu")
        if key == "random":
            from densekit.serve.backbones import build_from_arch
            from densekit.serve.checkpoint import read_checkpoint_metadata

            meta, _ = read_checkpoint_metadata(self.train_dir / "backbone.safetensors")
            # the trained architecture with the seed the run started from, no shipped weights
            return FeatureExtractor(build_from_arch(meta.name, meta.arch, seed=self.opts.seed, pretrained=False),
                                    device="cpu")
        return FeatureExtractor(key, device="cpu")

    def _eval_short_side(self, val: list[str]) -> int | None:
        """dino: the frames' own short side (DINO's protocol upsamples to 480; CPU time); crw: None (native)."""
        if self.opts.preset != "dino":
            return None
        from densekit.serve.davis import DavisRoot

        return int(min(DavisRoot(self.sample_dir).first_mask(val[0]).shape))

    def _eval_one(self, key: str, label: str, val: list[str]) -> dict[str, Any]:
        from densekit.apps.progress import progress_bar
        from densekit.retrieval.davis_protocol import progress_callback, score_davis
        from densekit.retrieval.propagation import config_from_options
        from densekit.serve.davis import DavisRoot
        from densekit.serve.imageio import read_image
        from densekit.serve.viz import pca_rgb

        out = self.eval_dir(key)
        shutil.rmtree(out, ignore_errors=True)
        extractor = self._extractor(key)
        short_side = self._eval_short_side(val)
        cfg = config_from_options(self.opts.preset, short_side=short_side)
        with progress_bar() as progress:
            score = score_davis(extractor, self.sample_dir, cfg, out, sequences=val, split="val",
                                on_frame=progress_callback(progress, f"{key}: "))
        davis = DavisRoot(self.sample_dir)
        for seq in val:
            first = read_image(davis.frame_paths(seq)[0])
            write_png(out / f"pca-{seq}.png", pca_rgb(extractor(first), size=first.shape[:2]))
        g, frames, track_s = score.summary(), score.frames, score.track_seconds
        row = {"key": key, "label": label, "J&F": g["J&F"], "J": g["J"], "F": g["F"],
               "sequences": score.result.sequence_means(), "frames": frames, "track_seconds": track_s,
               "fps": frames / max(track_s, 1e-9), "runs_on": f"{extractor.backend_name} ({extractor.provider})",
               "preset": self.opts.preset, "short_side": short_side,
               "processing_size": list(score.processing_sizes[val[0]])}
        self.sub(f"{label}: J&F {row['J&F']:.3f} (J {row['J']:.3f}, F {row['F']:.3f}), "
                 f"{frames} frames at {row['fps']:.1f} fps")
        return row

    def step_eval(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        val = list(sample["val"])
        number = 4
        self.log(f"[{number}/{len(STEPS)}] DAVIS J&F on the sample's val split ({', '.join(val)}), "
                 f"{preset_text(self.opts.preset)}")
        rows = []
        for key, label in self.models():
            inputs: dict[str, Any] = {"sample": self.finished("sample"), "preset": self.opts.preset, "key": key}
            if key == self.trained_key:
                inputs["export"] = self.finished("export")
            elif key == "random":
                inputs["train"] = self.finished("train")
            name = f"eval:{key}"
            outputs = [self.eval_dir(key) / "global_results-val.csv"] + [self.eval_dir(key) / f"pca-{s}.png" for s in val]
            entry = self.cached(name, inputs, outputs)
            if entry is not None:
                row = entry["result"]
                self.sub(f"{label}: skipped, done in an earlier run (J&F {row['J&F']:.3f})")
                self.skipped.append(name)
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                row = self._eval_one(key, label, val)
                self.record(name, inputs, time.perf_counter() - t0, row, time.process_time() - c0)
                self.ran.append(name)
            rows.append(row)
        return rows

    # -- 5. index and search ---------------------------------------------------------------------------

    def best(self, rows: list[dict[str, Any]]) -> str:
        """The candidate (trained or pretrained) with the higher J&F."""
        candidates = [r for r in rows if r["key"] in (self.trained_key, PRETRAINED)]
        return max(candidates, key=lambda r: r["J&F"])["key"]

    def step_index(self, sample: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        best = self.best(rows)
        onnx = self.onnx_path(best)
        inputs = {"sample": self.finished("sample"), "best": best, "model": self.finished(
            "export" if best == self.trained_key else "eval:" + best), "seed": self.opts.seed,
                  "path": str(onnx.resolve())}  # the index stores its model's absolute path: a moved OUT re-indexes
        grid = self.out / "search" / "grid.png"

        def body() -> dict[str, Any]:
            export = None
            if best != self.trained_key:
                previous = (self.manifest.get("index") or {}).get("result", {}).get("export")
                if onnx.is_file() and previous and not self.opts.force:  # written atomically: a file there is a finished, checked export
                    self.sub(f"best model is {best}: its ONNX export is already there ({onnx})")
                    export = previous
                else:
                    self.sub(f"best model is {best}: exporting it to ONNX for the index and the app")
                    export = self._export(best, onnx)
            result = build_index_and_search(self.sample_dir, sample, onnx, self.index_dir, grid, self.out,
                                            k=5 if self.opts.fast else 10, seed=self.opts.seed, log=self.sub)
            result.update(best=best, onnx=_rel(onnx, self.out), export=export)
            return result

        return self.run_step(5, "index", f"segment index of the sample frames with the best model ({best}) "
                             f"-> {self.index_dir}, one search", inputs, [self.index_dir / "meta.sqlite", grid, onnx], body)

    # -- 6. report -------------------------------------------------------------------------------------

    def step_report(self, parts: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: self.finished(k) for k in ("sample", "train", "export", "index")}
        inputs.update({f"eval:{k}": self.finished(f"eval:{k}") for k, _ in self.models()})
        inputs["app"] = parts["app_command"]
        report = self.out / "report.md"

        def body() -> dict[str, Any]:
            images = write_report_images(self, parts)
            text = report_markdown(self, parts, images, default_objective=DEFAULT_OBJECTIVE)
            write_text_atomic(report, text)
            self.sub(f"wrote {report} and {len(images)} pictures")
            return {"report": _rel(report, self.out), "images": sorted(images.values())}

        rdir = self.out / "report"
        pictures = [rdir / "jf.png", rdir / "pca.png"] + [rdir / f"overlays-{s}.png" for s in parts["sample"]["val"]]
        return self.run_step(6, "report", f"report -> {report}", inputs, [report, *pictures], body)


def clock_text(clock: str) -> str:
    """How a budget on ``clock`` reads in the demo's messages."""
    return "CPU time of the training process" if clock == "cpu" else "wall clock"


def tensorrt_unavailable() -> str | None:
    """None when TensorRT and a CUDA GPU are both here, else the "skipped" line (imports nothing heavy
    unless TensorRT is installed)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return TRT_SKIPPED
    import torch

    if not torch.cuda.is_available():
        return TRT_SKIPPED
    return None


# ----------------------------------------------------------------------------------------------------
# Index and search
# ----------------------------------------------------------------------------------------------------


def pick_query(sample_dir: Path, seqs: list[str]) -> tuple[Path, int, tuple[int, int], np.ndarray]:
    """A held-out query: among the odd frames of ``seqs`` (the index holds the even ones), the object that is
    most visible (largest inscribed disc), and the point deepest inside it (the maximum of its distance
    transform, the frame edge counting as outside); ties go to the first sequence, then the frame nearest
    the middle.

    Returns:
        (frame path, object id, (x, y), (H, W) bool mask of the object).
    """
    import cv2
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_mask

    davis = DavisRoot(sample_dir)
    best: tuple[float, Path, int, tuple[int, int], np.ndarray] | None = None
    for seq in seqs:
        frames = davis.frame_paths(seq)
        annos = davis.annotation_paths(seq)
        odd = [i for i in range(len(frames)) if i % 2 == 1] or list(range(len(frames)))
        for i in sorted(odd, key=lambda i: abs(i - len(frames) // 2)):
            mask = read_mask(annos[i])
            for obj in np.unique(mask[(mask > 0) & (mask < 255)]):
                region = mask == obj
                dist = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
                y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
                if best is None or float(dist[y, x]) > best[0]:
                    best = (float(dist[y, x]), frames[i], int(obj), (int(x), int(y)), region)
    if best is None:
        raise DensekitError(f"no visible object in any frame of {', '.join(seqs)}")
    _, frame, obj, point, region = best
    return frame, obj, point, region


def _semantic_path(sample_dir: Path, frame: Path) -> Path:
    return sample_dir / "SemanticAnnotations" / "480p" / frame.parent.name / f"{frame.stem}.png"


def hit_class(sample_dir: Path, frame: Path, mask: np.ndarray, classes: list[str]) -> str:
    """The majority class (SemanticAnnotations) under a segment mask of a sample frame."""
    from densekit.serve.imageio import read_mask

    sem = read_mask(_semantic_path(sample_dir, frame))
    if sem.shape != mask.shape or not mask.any():
        return "?"
    ids, counts = np.unique(sem[mask], return_counts=True)
    cid = int(ids[np.argmax(counts)])
    return classes[cid] if cid < len(classes) else str(cid)


def build_index_and_search(
    sample_dir: Path, sample: dict[str, Any], model: Path, index_dir: Path, grid: Path, out: Path,
    *, k: int = 10, seed: int = 0, log: Log = print,
) -> dict[str, Any]:
    """Index the even frames of every sample sequence, then search with a point on the most visible object of an
    odd (not indexed) frame of a val sequence; hits are labelled with their class.

    Returns a JSON-able dict: counts, the query, the hits (rank, score, frame, class) and class precision.
    """
    from densekit.apps.progress import progress_bar
    from densekit.retrieval.segment_index import SegmentIndex
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_image
    from densekit.serve.viz import write_grid

    davis = DavisRoot(sample_dir)
    classes = (sample_dir / "classes.txt").read_text(encoding="utf-8").split()
    files = [p for seq in davis.sequences() for i, p in enumerate(davis.frame_paths(seq)) if i % 2 == 0]
    shutil.rmtree(index_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with SegmentIndex.create(index_dir, str(model.resolve()), seed=seed) as idx, progress_bar(rate=False) as progress:
        task = progress.add_task("indexing", total=len(files))
        report = idx.add_images(files, progress=lambda _n, _a: progress.advance(task))
        n_images, n_segments = len(idx), idx.n_segments
        index_s = time.perf_counter() - t0
        log(f"indexed {n_images} frames ({n_segments} segments) in {fmt_seconds(index_s)}"
            + (f"; skipped {len(report.skipped)}" if report.skipped else ""))

        qpath, obj, point, obj_mask = pick_query(sample_dir, list(sample["val"]))
        query = read_image(qpath)
        qclass = hit_class(sample_dir, qpath, obj_mask, classes)
        t1 = time.perf_counter()
        # with the query region as the index sees it (the K-means segment under the point), for the picture
        found = idx.query_region(query, point=point, k=k)
        hits, region = found.hits, found.mask
        search_s = time.perf_counter() - t1
    write_grid(grid, query, region, hits)
    rows = []
    for rank, h in enumerate(hits, 1):
        p = Path(h.path) if h.path else None
        cls = hit_class(sample_dir, p, h.mask, classes) if p is not None else "?"
        rows.append({"rank": rank, "score": h.score, "frame": f"{p.parent.name}/{p.name}" if p else "-",
                     "class": cls, "same_class": cls == qclass})
    precision = sum(r["same_class"] for r in rows) / max(1, len(rows))
    log(f"query: {qpath.parent.name}/{qpath.name} at (x={point[0]}, y={point[1]}), object {obj} ({qclass}); "
        f"{sum(r['same_class'] for r in rows)} of {len(rows)} hits are {qclass} ({search_s * 1000:.0f} ms)")
    return {
        "index": _rel(index_dir, out), "images": n_images, "segments": n_segments, "index_seconds": index_s,
        "query": {"frame": f"{qpath.parent.name}/{qpath.name}", "path": _rel(qpath, out), "object": obj,
                  "class": qclass, "point": list(point)},
        "hits": rows, "precision": precision, "search_ms": search_s * 1000, "grid": _rel(grid, out), "k": k,
    }




# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def app_command(out: Path, onnx: Path, index: Path) -> str:
    """The shell command that opens the app on the demo's results."""
    import shlex

    return f"densekit app --model {shlex.quote(str(onnx))} --index {shlex.quote(str(index))}"


def run_demo(opts: DemoOptions, log: Log = print) -> DemoResult:
    """Run (or resume) the demo into ``opts.out``; see the module docstring.

    Raises:
        DensekitError: bad options or an unusable ``out`` (checked before anything is written), or a step
            failing on bad input.
    """
    validate_options(opts)
    t0 = time.perf_counter()
    resuming = prepare_out(opts.out)
    with _exclusive(opts.out):
        return _run(opts, log, resuming, t0)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``OUT/demo.lock`` so that two demos never write one folder at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DensekitError(f"another densekit demo is running on {out}; wait for it or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(opts: DemoOptions, log: Log, resuming: bool, t0: float) -> DemoResult:
    demo = _Demo(opts, log)
    if opts.force:
        log(f"densekit demo -> {opts.out} (--force: every step runs again)")
    elif resuming:
        log(f"densekit demo -> {opts.out}: it exists, resuming; steps already done are skipped (--force redoes them)")
    else:
        log(f"densekit demo -> {opts.out}")
    demo.manifest.data["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    demo.manifest.save()

    sample = demo.step_sample()
    train = demo.step_train(sample)
    export = demo.step_export()
    rows = demo.step_eval(sample)
    index = demo.step_index(sample, rows)
    best = index["best"]
    command = app_command(opts.out, opts.out / index["onnx"], opts.out / index["index"])
    parts = {"sample": sample, "train": train, "export": export, "jf": rows, "index": index, "app_command": command}
    report = demo.step_report(parts)
    seconds = time.perf_counter() - t0

    log("")
    width = max(len(r["label"]) for r in rows)
    log(f"{'model'.ljust(width)}    J&F      J      F")
    for r in rows:
        log(f"{r['label'].ljust(width)}  {r['J&F']:.3f}  {r['J']:.3f}  {r['F']:.3f}")
    log("")
    log(f"report: {opts.out / report['report']}   ({fmt_seconds(seconds)}; "
        f"{len(demo.ran)} step(s) ran, {len(demo.skipped)} skipped)")
    log("open the app on these results:")
    log(f"  {command}")
    return DemoResult(out=opts.out, report=opts.out / report["report"], app_command=command, jf=rows, best=best,
                      seconds=seconds, ran=demo.ran, skipped=demo.skipped)


__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_OBJECTIVE",
    "DemoOptions",
    "DemoResult",
    "app_command",
    "build_index_and_search",
    "pick_query",
    "prepare_out",
    "run_demo",
    "tensorrt_unavailable",
    "validate_options",
]
