"""The web app's package of rooms (densekit.apps.app): installed, light to import, small functions."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 120


def test_every_subpackage_of_the_areas_is_in_the_wheel_list() -> None:
    """setuptools installs only the packages pyproject names: a package folder left out is missing from the wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapped = {(ROOT / folder).resolve(): name for name, folder in tool["package-dir"].items()}
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            owner = next(mapped[d] for d in [init.parent.resolve(), *init.parent.resolve().parents] if d in mapped)
            if owner != name:  # a folder mapped as a package of its own (densekit itself lives in apps/api)
                continue
            rel = init.parent.relative_to(ROOT / folder)
            package = ".".join([name, *rel.parts])
            assert package in listed, f"{init.parent.relative_to(ROOT)} is not in pyproject's packages ({package})"
    assert "densekit.apps.app" in listed


def test_importing_the_app_package_loads_no_gradio_or_model() -> None:
    code = (
        "import sys\n"
        "from densekit.apps.app import DEFAULT_SAMPLES_DIR, build_app, launch_kwargs, tracking_loop, click_mask\n"
        "heavy = [m for m in ('gradio', 'torch', 'cv2', 'skimage') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_rooms_import_each_other_not_the_package() -> None:
    """A room importing ``densekit.apps.app`` itself would run the package's __init__, which imports every room."""
    for path in sorted((ROOT / "apps" / "app").glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "densekit.apps.app", f"{path.name}:{node.lineno} imports the package"


def test_no_function_in_apps_is_longer_than_a_screen_or_two() -> None:
    long = []
    for path in sorted((ROOT / "apps").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - start + 1})")
    assert not long, long
