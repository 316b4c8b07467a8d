"""The package installs under one namespace and its CLI answers --help without heavy imports."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("serve", "train", "export", "retrieval", "apps")


@pytest.mark.slow
def test_wheel_installs_only_the_densekit_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("densekit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"densekit"}, f"unexpected top-level entries: {sorted(top - dist_info)}"
    for area in AREAS:
        assert f"densekit/{area}/__init__.py" in names
    assert not any(n.startswith("densekit/tests/") for n in names)
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "densekit = densekit.apps.cli:main" in text


@pytest.mark.parametrize("area", AREAS)
def test_areas_import_as_densekit_namespace(area: str) -> None:
    import importlib

    module = importlib.import_module(f"densekit.{area}")
    assert Path(module.__file__).resolve().parent == ROOT / area


@pytest.mark.parametrize(
    "args",
    [[], ["track"], ["eval", "davis"], ["eval", "retrieval"], ["data", "sample"], ["info"], ["train"], ["serve"],
     ["export", "onnx"], ["export", "trt"], ["index", "build"], ["index", "search"], ["app"], ["demo"]],
)
def test_help_does_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from densekit.apps.cli import main\n"
        f"rc = main({args + ['--help']!r})\n"
        "heavy = [m for m in ('torch', 'timm', 'cv2', 'skimage', 'matplotlib', 'gradio', 'faiss', 'pymilvus')\n"
        "         if m in sys.modules]\n"
        "assert rc == 0, rc\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_serve_imports_without_torch() -> None:
    code = "import sys, densekit.serve, densekit.serve.contract; assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_import_direction() -> None:
    """serve/ is the ground floor: it imports no other densekit area; nothing imports apps/."""
    import re

    pattern = re.compile(r"^\s*(?:from|import)\s+densekit\.(\w+)", re.M)
    allowed = {
        "serve": {"serve"},
        "train": {"serve", "train"},
        "retrieval": {"serve", "retrieval"},
        "export": {"serve", "train", "export"},
        "apps": set(AREAS),
    }
    for area in AREAS:
        for path in (ROOT / area).rglob("*.py"):
            used = set(pattern.findall(path.read_text()))
            assert used <= allowed[area], f"{path.relative_to(ROOT)} imports {sorted(used - allowed[area])}"
