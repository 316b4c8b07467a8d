"""``densekit demo --fast`` end to end in a temporary folder: the report and its pictures, the J&F table, the
ONNX model's contract, the printed app command, resumption, and bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from densekit.apps.cli import main

MODEL_KEYS = ("trained", "efficientnet_lite0", "random", "pixels")


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``densekit ARGS`` in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One --fast demo run: (OUT, what it printed)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    rc, stdout, stderr = run_cli(["demo", "--out", str(out), "--fast"])
    assert rc == 0, stderr[-2000:]
    return out, stdout


def _jf_table(report: str) -> dict[str, list[float]]:
    """The first markdown table after '## J&F at a glance': label -> [J&F, J, F]."""
    section = report.split("## J&F at a glance", 1)[1]
    rows: dict[str, list[float]] = {}
    for line in section.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("model", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = [float(c) for c in cells[1:4]]
    return rows


def test_report_links_existing_pictures(demo: tuple[Path, str]) -> None:
    from PIL import Image

    out, _ = demo
    text = (out / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    # J&F chart, loss curve, one overlay strip per val sequence, PCA, search grid
    val = (out / "sample" / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert len(links) >= 4 + len(val)
    assert any("overlays-" + seq in link for seq in val for link in links)
    for link in links:
        assert not Path(link).is_absolute() and link.endswith(".png"), link
        path = out / link
        assert path.is_file(), link
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 32
    # no temp files left behind (atomic writes use hidden '.name.XXXX' files beside the destination); a lock
    # file may stay (a writer's advisory lock is taken on it, and removing it on release would race)
    assert not [p for p in out.rglob(".*") if p.suffix != ".lock"]


def test_jf_table_has_every_model_and_matches_the_evaluator(demo: tuple[Path, str]) -> None:
    out, _ = demo
    table = _jf_table((out / "report.md").read_text(encoding="utf-8"))
    assert len(table) == len(MODEL_KEYS)
    labels = list(table)
    assert "fine-tuned" in labels[0] and "ONNX" in labels[0]  # the default fine-tunes the pretrained start
    assert any("efficientnet_lite0" in lab and "the start" in lab for lab in labels)
    assert any("random init" in lab for lab in labels)
    assert any(lab == "pixels" for lab in labels)
    for (label, (jf, j, f)), key in zip(table.items(), MODEL_KEYS):
        assert all(0.0 <= v <= 1.0 for v in (jf, j, f)), label
        assert abs(jf - (j + f) / 2) <= 0.0011, label
        # the number in the report is the one the official-format CSV of that model holds
        with open(out / "eval" / key / "global_results-val.csv", newline="") as fh:
            row = next(csv.DictReader(fh))
        assert f"{jf:.3f}" == f"{float(row['J&F-Mean']):.3f}", label
    # a pretrained ImageNet backbone tracks far better than an untrained one of any kind
    scores = {key: v[0] for key, v in zip(MODEL_KEYS, table.values())}
    assert scores["efficientnet_lite0"] > scores["random"]


def test_onnx_model_loads_with_the_checkpoint_contract(demo: tuple[Path, str]) -> None:
    from densekit.serve.checkpoint import read_checkpoint_metadata
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import read_image
    from densekit.serve.onnx_meta import read_onnx_meta

    out, _ = demo
    (onnx_path,) = [p for p in (out / "export").glob("*/model.onnx") if "hiergroup" in p.parent.name]
    onnx_meta = read_onnx_meta(onnx_path)
    ckpt_meta, _ = read_checkpoint_metadata(out / "train" / "backbone.safetensors")
    assert onnx_meta is not None
    assert onnx_meta == ckpt_meta
    assert onnx_meta.objective == "hiergroup" and onnx_meta.name == "efficientnet_lite0"
    ext = FeatureExtractor(onnx_path, device="cpu", backend="onnxruntime")  # auto may be OpenVINO on a bf16 CPU
    assert ext.backend_name == "onnxruntime"
    frame = read_image(min((out / "sample" / "JPEGImages" / "480p").glob("*/00000.jpg")))
    feats = ext(frame)
    m, s = onnx_meta.input_multiple, onnx_meta.stride
    assert feats.shape == (onnx_meta.dim, frame.shape[0] // m * m // s, frame.shape[1] // m * m // s)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=0), 1.0, atol=1e-4)
    manifest = json.loads((out / "demo.json").read_text())
    tensorrt = manifest["steps"]["export"]["result"]["tensorrt"]["status"]
    from densekit.apps.demo import TRT_SKIPPED, tensorrt_unavailable

    if tensorrt_unavailable() is not None:
        assert tensorrt == TRT_SKIPPED


def test_printed_app_command_names_existing_paths(demo: tuple[Path, str]) -> None:
    from densekit.retrieval.segment_index import SegmentIndex

    out, stdout = demo
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    assert lines[-1].startswith("densekit app ")
    argv = shlex.split(lines[-1])
    model = Path(argv[argv.index("--model") + 1])
    index = Path(argv[argv.index("--index") + 1])
    assert model.suffix == ".onnx" and model.is_file()
    assert (index / "meta.sqlite").is_file()
    with SegmentIndex.open(index) as idx:
        assert len(idx) > 0 and idx.n_segments >= len(idx)
        # the index was built with the very model the app is told to load
        assert Path(idx.info["model"]) == model.resolve()
    assert f"```bash\n{lines[-1]}\n```" in (out / "report.md").read_text()


def test_resuming_skips_done_steps_and_redoes_missing_ones(demo: tuple[Path, str]) -> None:
    out, _ = demo
    before = json.loads((out / "demo.json").read_text())["steps"]
    report_mtime = (out / "report.md").stat().st_mtime_ns

    rc, stdout, stderr = run_cli(["demo", "--out", str(out), "--fast"])
    assert rc == 0, stderr[-2000:]
    assert "resuming" in stdout
    step_lines = [ln for ln in stdout.splitlines() if re.match(r"\[\d/6\]", ln)]
    assert len(step_lines) == 6
    assert all("skipped" in ln for ln in step_lines if not ln.startswith("[4/6]")), step_lines
    assert sum("skipped, done in an earlier run" in ln for ln in stdout.splitlines()) == 5 + len(MODEL_KEYS)
    after = json.loads((out / "demo.json").read_text())["steps"]
    assert {k: v.get("finished") for k, v in after.items()} == {k: v.get("finished") for k, v in before.items()}
    assert (out / "report.md").stat().st_mtime_ns == report_mtime

    # a lost output: its step and the ones after it run again, the others stay skipped (the rerun makes the
    # same files, so the other tests of this module see the same results whatever their order)
    (out / "search" / "grid.png").unlink()
    rc, stdout, stderr = run_cli(["demo", "--out", str(out), "--fast"])
    assert rc == 0, stderr[-2000:]
    status = {ln[:5]: "skipped" in ln for ln in stdout.splitlines() if re.match(r"\[\d/6\]", ln)}
    del status["[4/6]"]  # a header: its models say "skipped" one per line
    assert status == {"[1/6]": True, "[2/6]": True, "[3/6]": True, "[5/6]": False, "[6/6]": False}
    assert sum("skipped, done in an earlier run" in ln for ln in stdout.splitlines()) == 3 + len(MODEL_KEYS)
    assert (out / "search" / "grid.png").is_file()
    again = json.loads((out / "demo.json").read_text())["steps"]
    assert again["index"]["finished"] > before["index"]["finished"]
    assert again["train"]["finished"] == before["train"]["finished"]


def test_a_second_demo_on_the_same_folder_is_refused(demo: tuple[Path, str]) -> None:
    fcntl = pytest.importorskip("fcntl")
    out, _ = demo
    with open(out / "demo.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # as a running demo holds it
        try:
            rc, _, stderr = run_cli(["demo", "--out", str(out), "--fast"])
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    assert rc == 2
    assert stderr.strip().startswith("error: another densekit demo is running") and len(stderr.strip().splitlines()) == 1


def test_demo_jf_is_what_eval_davis_prints(demo: tuple[Path, str], tmp_path: Path) -> None:
    """The demo scores with the one DAVIS protocol: `densekit eval davis` with the preset and short side the
    report names gives the demo's J&F, to the last bit."""
    from densekit.retrieval.davis_eval import evaluate_davis

    out, _ = demo
    row = json.loads((out / "demo.json").read_text())["steps"]["eval:efficientnet_lite0"]["result"]
    assert row["preset"] == "dino" and row["short_side"] == 96  # the fast sample's own short side
    cmd = ["eval", "davis", str(out / "sample"), "--out", str(tmp_path / "cli"), "--split", "val", "--backbone",
           "efficientnet_lite0", "--preset", row["preset"], "--short-side", str(row["short_side"])]
    assert f"--preset {row['preset']} --short-side {row['short_side']}" in (out / "report.md").read_text()
    rc, _, stderr = run_cli(cmd)
    assert rc == 0, stderr
    g = evaluate_davis(out / "sample", tmp_path / "cli", split="val").global_row
    assert (g["J&F-Mean"], g["J-Mean"], g["F-Mean"]) == (row["J&F"], row["J"], row["F"])


def test_training_minutes_go_to_the_trainers_budget(tmp_path: Path) -> None:
    from densekit.apps.demo import DemoOptions, _Demo

    cfg = _Demo(DemoOptions(out=tmp_path, minutes=0.5), print)._train_config(tmp_path / "train")
    assert (cfg.budget_s, cfg.clock) == (30.0, "cpu") and cfg.max_steps > 10_000  # the budget sets the length
    wall = _Demo(DemoOptions(out=tmp_path, minutes=0.5, clock="wall"), print)._train_config(tmp_path / "train")
    assert wall.clock == "wall"
    fast = _Demo(DemoOptions(out=tmp_path, fast=True), print)._train_config(tmp_path / "train")
    assert (fast.budget_s, fast.max_steps) == (0.0, 3)


def test_the_default_fine_tunes_the_pretrained_start_with_the_shipped_recipe(tmp_path: Path) -> None:
    from densekit.apps.demo import FINETUNE_LR, FINETUNE_RECIPE, DemoOptions, _Demo
    from densekit.train.config import build_config

    recipe = build_config(FINETUNE_RECIPE)
    cfg = _Demo(DemoOptions(out=tmp_path), print)._train_config(tmp_path / "train")
    assert cfg.backbone == "efficientnet_lite0" and cfg.objective == recipe.objective
    assert cfg.finetune == recipe.finetune and cfg.finetune.freeze_until  # the recipe's freeze and rates
    assert cfg.optim.lr == FINETUNE_LR < recipe.optim.lr  # the sample's short run takes smaller steps
    scratch = _Demo(DemoOptions(out=tmp_path, backbone="resnet18"), print)._train_config(tmp_path / "train")
    assert not scratch.finetune.freeze_until and scratch.finetune.backbone_lr_mult == 1.0


@pytest.mark.parametrize(
    "case",
    ["out_is_a_file", "out_under_a_file", "minutes_zero", "minutes_negative", "foreign_folder", "unknown_objective",
     "unknown_clock"],
)
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["demo", "--fast"]
    if case == "out_is_a_file":
        out.write_text("not a folder")
    elif case == "out_under_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    elif case == "minutes_zero":
        args += ["--minutes", "0"]
    elif case == "minutes_negative":
        args += ["--minutes", "-2"]
    elif case == "foreign_folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "unknown_objective":
        args += ["--objective", "nosuch"]
    elif case == "unknown_clock":
        args += ["--clock", "sundial"]
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    rc, _, stderr = run_cli(args + ["--out", str(out)])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, nothing lost


def test_help_names_the_default_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from densekit.apps.cli import main\n"
        "rc = main(['demo', '--help'])\n"
        "heavy = [m for m in ('torch', 'timm', 'cv2', 'skimage', 'matplotlib', 'gradio') if m in sys.modules]\n"
        "assert rc == 0, rc\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "hiergroup" in text and "efficientnet_lite0" in text and "--clock" in text and "--fast" in text and "--force" in text
