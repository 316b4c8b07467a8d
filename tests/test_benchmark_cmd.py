"""``densekit benchmark``: every runtime of this machine in one table, JSON and plot; a missing one is a row
that says why; bad options are one line and exit 2."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from densekit.apps.cli import main


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from densekit.serve.sample import make_sample

    tmp = tmp_path_factory.mktemp("bench")
    root = make_sample(tmp / "sample", sequences=3, frames=8, height=96, width=160, seed=0)
    out = tmp / "out"
    rc, stdout, stderr = run_cli(["benchmark", "resnet18", "--out", str(out), "--davis", str(root),
                                  "--runtimes", "torch,onnxruntime,openvino,tensorrt", "--sizes", "64x96,96x128",
                                  "--repeats", "1", "--batch", "2", "--threads", "1"])
    assert rc == 0, stderr[-2000:]
    return out, stdout


def test_table_json_and_plot(bench: tuple[Path, str]) -> None:
    out, stdout = bench
    data = json.loads((out / "benchmark.json").read_text())
    rows = {r["runtime"]: r for r in data["rows"]}
    assert list(rows) == ["torch", "onnxruntime", "openvino", "tensorrt"]
    assert rows["torch"]["cosine"] == pytest.approx(1.0)  # the reference itself
    assert rows["onnxruntime"]["cosine"] > 0.9999 and rows["onnxruntime"]["worst_location_cosine"] > 0.999
    for name in ("torch", "onnxruntime"):
        assert set(rows[name]["latency_ms"]) == {"64x96", "96x128"}
        assert all(v > 0 for v in rows[name]["latency_ms"].values()) and rows[name]["throughput_fps"] > 0
    # the same features track the same: J&F of the runtimes agree
    assert rows["torch"]["jf"] > 0.0  # scored (a random-init resnet18 on 8 tiny frames tracks little)
    assert abs(rows["onnxruntime"]["jf"] - rows["torch"]["jf"]) < 0.01
    from densekit.apps.demo import tensorrt_unavailable

    if tensorrt_unavailable() is not None:
        assert rows["tensorrt"]["status"].startswith("skipped") and rows["tensorrt"]["latency_ms"] == {}
        (line,) = [ln for ln in stdout.splitlines() if ln.startswith("tensorrt ")]
        assert "skipped" in line
    for name in rows:
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    assert "flags" in data["cpu"]  # lscpu's model and flags go beside the figures
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_openvino_row_is_real_or_says_why(bench: tuple[Path, str]) -> None:
    import importlib.util

    out, _ = bench
    row = next(r for r in json.loads((out / "benchmark.json").read_text())["rows"] if r["runtime"] == "openvino")
    if importlib.util.find_spec("openvino") is None:
        assert row["status"].startswith("skipped: openvino not installed")
    else:
        assert row["status"] == "ok" and row["cosine"] > 0.9999 and "openvino:CPU" in row["provider"]


@pytest.mark.parametrize("args", [
    ["--runtimes", "torch,cuda-magic"],
    ["--sizes", "64x"],
    ["--sizes", "8x8"],
    ["--repeats", "0"],
    ["--preset", "fastest"],
    ["--davis", "/nonexistent/davis"],
], ids=["runtime", "size-syntax", "size-range", "repeats", "preset", "davis"])
def test_bad_options_are_one_line(args: list[str], tmp_path: Path) -> None:
    rc, _, stderr = run_cli(["benchmark", "resnet18", "--out", str(tmp_path / "o"), *args])
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not (tmp_path / "o").exists()  # refused before anything is written
