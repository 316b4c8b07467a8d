"""The report of ``densekit demo``: ``OUT/report.md`` and its pictures in ``OUT/report/``.

:func:`write_report_images` draws the J&F chart, the loss curve, one strip of overlays per held-out
sequence and the PCA sheet; :func:`report_markdown` writes the text around them. Both read what the runner
(:mod:`densekit.apps.demo`) holds - its options, manifest, folders and the step results - from the object
passed as ``demo`` (duck-typed, so that this module imports nothing of the runner), and the small helpers
here (:func:`fmt_seconds`, :func:`rel`, :func:`log_records`, :func:`write_png`) serve both.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError

__all__ = [
    "fmt_seconds",
    "jf_chart",
    "last_logged_loss",
    "log_records",
    "loss_chart",
    "overlay_strip",
    "preset_text",
    "rel",
    "report_markdown",
    "write_png",
    "write_report_images",
]


def fmt_seconds(s: float) -> str:
    """``4.2 s``, ``3 min 05 s``."""
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s"


def rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def log_records(log_file: Path) -> list[dict[str, Any]]:
    """The JSON objects of a training ``log.jsonl`` (none if it is missing); unreadable lines skipped."""
    records = []
    if log_file.is_file():
        for line in log_file.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def last_logged_loss(log_file: Path) -> float | None:
    losses = [float(rec["loss"]) for rec in log_records(log_file) if "loss" in rec]
    return losses[-1] if losses else None


def preset_text(preset: str) -> str:
    """How the propagation preset is run, in words (see densekit.retrieval.propagation.PRESETS)."""
    if preset == "dino":
        return "dino preset (first + last 7 frames, top-5, T 0.1) with the frames' native short side"
    return "crw preset (first + last 20 frames, top-10, T 0.05) at the frames' native size"


def write_png(dest: Path, rgb: np.ndarray) -> None:
    import cv2

    with atomic_path(dest, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
            raise DensekitError(f"could not write {dest}")


def _label_tile(text: str, height: int, width: int, colour: tuple[int, int, int] = (245, 245, 245)) -> np.ndarray:
    """A (height, width, 3) tile with ``text`` wrapped onto lines."""
    import cv2

    tile = np.full((height, width, 3), colour, np.uint8)
    scale, thick = 0.45, 1
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if cv2.getTextSize(trial, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] > width - 10 and line:
            lines.append(line)
            line = w
        else:
            line = trial
    if line:
        lines.append(line)
    y = max(16, (height - 18 * len(lines)) // 2 + 12)
    for ln in lines:
        cv2.putText(tile, ln, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), thick, cv2.LINE_AA)
        y += 18
    return tile


def _fit(img: np.ndarray, width: int) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if w == width:
        return img
    return cv2.resize(img, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def overlay_strip(frames: list[np.ndarray], rows: list[tuple[str, list[np.ndarray]]], col_titles: list[str],
                  tile_w: int, label_w: int = 170) -> np.ndarray:
    """A picture with one row per (label, masks): each frame with its mask overlaid, label on the left."""
    from densekit.serve.imageio import overlay

    tiles_h = _fit(frames[0], tile_w).shape[0]
    head = [_label_tile("", 24, label_w)] + [_label_tile(t, 24, tile_w) for t in col_titles]
    out_rows = [np.concatenate(head, axis=1)]
    for label, masks in rows:
        cells = [_label_tile(label, tiles_h, label_w)]
        for f, m in zip(frames, masks):
            cells.append(_fit(overlay(f, m, 0.5), tile_w))
        out_rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(out_rows, axis=0)


def jf_chart(rows: list[dict[str, Any]], dest: Path, title: str) -> None:
    """Grouped bars (J, F, J&F) per model, written atomically as PNG with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 1.7 * len(rows) + 1.5), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for off, key, colour, name in ((-0.27, "J", "#4C72B0", "J (region)"), (0.0, "F", "#DD8452", "F (boundary)"),
                                   (0.27, "J&F", "#55A868", "J&F")):
        vals = [r[key] for r in rows]
        bars = ax.bar(x + off, vals, width=0.27, color=colour, label=name)
        if key == "J&F":
            ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def loss_chart(log_file: Path, dest: Path, title: str) -> bool:
    """Training loss against step from ``log.jsonl``; False when there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(int(rec["step"]), float(rec["loss"])) for rec in log_records(log_file) if "loss" in rec and "step" in rec]
    if not pts:
        return False
    fig = Figure(figsize=(6.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return True


def write_report_images(demo: Any, parts: dict[str, Any]) -> dict[str, str]:
    """Every PNG of the report (name -> path relative to OUT)."""
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_image, read_mask

    out = demo.out
    rdir = out / "report"
    rows = parts["jf"]
    images: dict[str, str] = {}
    jf_png = rdir / "jf.png"
    jf_chart(rows, jf_png, f"DAVIS J&F on the sample's val split ({demo.opts.preset} preset)")
    images["jf"] = rel(jf_png, out)
    loss_png = rdir / "train-loss.png"
    if loss_chart(demo.train_dir / "log.jsonl", loss_png, f"training loss: {demo.label}"):
        images["loss"] = rel(loss_png, out)

    davis = DavisRoot(demo.sample_dir)
    val = parts["sample"]["val"]
    first_frames = []
    for seq in val:
        paths = davis.frame_paths(seq)
        n = len(paths)
        picks = sorted({round(float(t)) for t in np.linspace(0, n - 1, min(4, n))})
        frames = [read_image(paths[i]) for i in picks]
        first_frames.append(frames[0])
        tile_w = min(frames[0].shape[1], 288)
        strip_rows = [("ground truth", [read_mask(p) for p in (davis.annotation_paths(seq)[i] for i in picks)])]
        for r in rows:
            strip_rows.append((f"{r['label']}  J&F {r['J&F']:.3f}",
                               [read_mask(demo.eval_dir(r["key"]) / seq / f"{paths[i].stem}.png") for i in picks]))
        titles = [f"frame {paths[i].stem}" + (" (given)" if i == 0 else "") for i in picks]
        png = rdir / f"overlays-{seq}.png"
        write_png(png, overlay_strip(frames, strip_rows, titles, tile_w))
        images[f"overlays-{seq}"] = rel(png, out)

    # PCA: one row per val sequence (its first frame), one column per model
    tile_w = min(first_frames[0].shape[1], 288)
    head = [_label_tile("frame", 24, tile_w)] + [_label_tile(r["label"], 24, tile_w) for r in rows]
    pca_rows = [np.concatenate(head, axis=1)]
    for seq, frame in zip(val, first_frames):
        cells = [_fit(frame, tile_w)]
        for r in rows:
            cells.append(_fit(read_image(demo.eval_dir(r["key"]) / f"pca-{seq}.png"), tile_w))
        h = min(c.shape[0] for c in cells)
        pca_rows.append(np.concatenate([c[:h] for c in cells], axis=1))
    png = rdir / "pca.png"
    write_png(png, np.concatenate(pca_rows, axis=0))
    images["pca"] = rel(png, out)
    images["search"] = parts["index"]["grid"]
    return images


def _protocol_text(rows: list[dict[str, Any]]) -> str:
    """Where the frames were processed and the command with the same protocol (``score_davis``)."""
    row = rows[0] if rows else {}
    if "processing_size" not in row:
        return ""
    h, w = row["processing_size"]
    side = f" --short-side {row['short_side']}" if row.get("short_side") else ""
    return (f" (frames processed at {w}x{h}: what `densekit eval davis sample --split val --preset {row['preset']}"
            f"{side} --backbone MODEL` does)")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(demo: Any, parts: dict[str, Any], images: dict[str, str], *, default_objective: str = "") -> str:
    """The text of ``OUT/report.md`` (images linked relative to OUT); ``default_objective`` is explained
    as the default when it is the one that ran."""
    import platform

    opts = demo.opts
    sample, train, export, rows, index = parts["sample"], parts["train"], parts["export"], parts["jf"], parts["index"]
    spec = opts.sample_spec
    steps = demo.manifest.data["steps"]
    total = sum(float(e.get("seconds", 0.0)) for k, e in steps.items() if e.get("done") and k != "report")
    cmd = "densekit demo --out " + str(opts.out) + (" --fast" if opts.fast else f" --minutes {opts.minutes:g} --clock {opts.clock}") + \
        f" --objective {opts.objective} --backbone {opts.backbone}"
    L: list[str] = []
    L.append("# densekit demo report\n")
    L.append(f"Made by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M')} ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores). Steps took {fmt_seconds(total)} in all (table at the end); "
             "wall-clock figures depend on what else the machine was running.\n")
    L.append("## J&F at a glance\n")
    L.append(_md_table(
        ["model", "J&F", "J", "F", "runs on", "fps"],
        [[r["label"], f"{r['J&F']:.3f}", f"{r['J']:.3f}", f"{r['F']:.3f}", r["runs_on"], f"{r['fps']:.1f}"]
         for r in rows],
    ))
    L.append(f"\n![J&F per model]({images['jf']})\n")
    L.append(f"Semi-supervised DAVIS protocol (official J&F, first and last frames excluded) on the sample's "
             f"held-out `val` split ({', '.join(sample['val'])}); masks propagate from the first frame with the "
             f"{preset_text(opts.preset)}{_protocol_text(rows)}. Best of trained and pretrained: **{index['best']}**, "
             "used for the index and "
             "the app. Random init is the trained architecture with the seed training started from; pixels is "
             "normalised RGB at stride 8.\n")
    L.append("## 1. Data\n")
    L.append(f"`make_sample`: {spec.sequences} sequences x {spec.frames} frames at {spec.width}x{spec.height} "
             f"(seed {opts.seed}) in `sample/`: train {', '.join(sample['train'])}; val {', '.join(sample['val'])}.\n")
    L.append("## 2. Training\n")
    clock = "CPU time of the training process" if train.get("clock") == "cpu" else "wall clock"
    budget = f"{opts.train_spec.steps} steps (--fast)" if opts.fast else (
        f"{opts.minutes:g} min of {clock} (used {float(train.get('budget_seconds') or 0):.0f} s of it, "
        f"{float(train.get('train_seconds') or 0):.0f} s wall)")
    why = "" if opts.objective != default_objective else (
        " (the default: it learned most from scratch in `benchmarks/train_quality.py`, and fine-tuned the "
        "pretrained Lite0 above its start on davis2016-val12)")
    how = ("fine-tuning the ImageNet-pretrained start with the recipe of "
           "`train/configs/hiergroup_finetune_lite0.yaml` (stem and first two stages frozen, the rest at a tenth "
           "of the heads' learning rate)" if getattr(opts, "finetune", False) else "training")
    L.append(f"`{opts.objective}`{why} on `{opts.backbone}`, {how}; budget {budget}: {train['steps']} steps of "
             f"batch {train['batch_size']} at {train['crop']}x{train['crop']} on the train split, "
             f"{train['samples_per_s']:.2f} samples/s, last logged loss "
             + (f"{train['loss']:.4f}" if train.get("loss") is not None else "-")
             + (f"; the trainer timed {train['seconds_per_step']:.2f} s/step and scheduled {train['max_steps']} steps to "
                "fill the budget" if train.get("seconds_per_step") else "")
             + ("; the budget ran out before the schedule's end" if train.get("stopped_by_budget") else "")
             + ". Run folder `train/` (config.yaml, state, backbone.safetensors, log.jsonl).\n")
    if "loss" in images:
        L.append(f"![training loss]({images['loss']})\n")
    L.append("## 3. Export\n")
    parity = "; ".join(f"{p['size'][0]}x{p['size'][1]} batch {p['batch']}: cosine {p['cosine']:.7f}, "
                       f"max abs diff {p['max_abs']:.2g}" for p in export["parity"])
    L.append(f"`{export['onnx']}` ({export['exporter']} exporter, opset {export['opset']}), ONNX Runtime against "
             f"PyTorch on real photographs: {parity or 'not checked'}. TensorRT: {export['tensorrt']['status']}.\n")
    if index.get("export"):
        L.append(f"The pretrained model was exported for the index and the app too: `{index['export']['onnx']}`.\n")
    L.append("## 4. Tracking, frame by frame\n")
    L.append("Rows: ground truth, then each model; the first column is the given mask.\n")
    for seq in sample["val"]:
        L.append(f"**{seq}**\n\n![overlays {seq}]({images['overlays-' + seq]})\n")
    L.append("Per sequence J&F:\n")
    seqs = sample["val"]
    L.append(_md_table(["model"] + seqs, [[r["label"]] + [
        next((f"{(j + f) / 2:.3f}" for s, j, f in r["sequences"] if s == seq), "-") for seq in seqs] for r in rows]))
    L.append("")
    L.append("## 5. What the features see\n")
    L.append("First three principal components of each model's dense features as RGB "
             "(`densekit.serve.viz.pca_rgb`, as Figure 2 of Zhang and Maire 2020), first frame of each val sequence.\n")
    L.append(f"![PCA of the features]({images['pca']})\n")
    L.append("## 6. Segment search\n")
    q = index["query"]
    L.append(f"`SegmentIndex` in `{index['index']}` with `{index['onnx']}`: {index['images']} frames (every second "
             f"frame of every sequence), {index['segments']} K-means segments. Query: a point "
             f"(x={q['point'][0]}, y={q['point'][1]}) on object {q['object']} ({q['class']}) of the held-out frame "
             f"`{q['frame']}`; {sum(h['same_class'] for h in index['hits'])} of {len(index['hits'])} hits show the same "
             f"class (precision {index['precision']:.2f}).\n")
    L.append(f"![search grid]({images['search']})\n")
    L.append(_md_table(["rank", "score", "frame", "class"],
                       [[str(h["rank"]), f"{h['score']:.3f}", h["frame"], h["class"]] for h in index["hits"]]))
    L.append("")
    L.append("## 7. Open the app\n")
    L.append(f"```bash\n{parts['app_command']}\n```\n")
    L.append("## Timings\n")
    trows = []
    for k in ("sample", "train", "export") + tuple(f"eval:{m}" for m, _ in demo.models()) + ("index",):
        e = steps.get(k)
        if e and e.get("done"):
            trows.append([k, fmt_seconds(float(e["seconds"])),
                          "this run" if k in demo.ran else "earlier run"])
    L.append(_md_table(["step", "time", "when"], trows))
    L.append("")
    return "\n".join(L) + "\n"
