"""The package installs under one namespace, imports one way without circles, and its CLI and
``import densekit`` stay free of heavy imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("serve", "train", "export", "retrieval", "apps")
PUBLIC_API = ("FeatureExtractor", "MaskPropagator", "SegmentIndex", "load_backbone", "score_davis", "evaluate_davis")


@pytest.mark.slow
def test_wheel_installs_only_the_densekit_namespace(tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)  # pip builds in the tree: no stale modules
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
    assert "densekit/__init__.py" in names  # the public API, from apps/api/
    assert not any(n.startswith("densekit/apps/api/") for n in names)  # and nowhere else
    dirs = sorted(_package_dirs().items(), key=lambda kv: -len(kv[0]))
    for name in (n for n in names if n.endswith(".py")):
        module = name[: -len(".py")].replace("/", ".")
        package, folder = next((p, f) for p, f in dirs if module.startswith(p + "."))
        source = folder.joinpath(*module[len(package) + 1 :].split(".")).with_suffix(".py")
        assert source.is_file(), f"{name} has no source in the tree"
    assert not any(n.startswith("densekit/tests/") for n in names)
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "densekit = densekit.apps.cli:main" in text
    # the installed wheel (not this checkout) answers the public API
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import densekit, densekit.serve.extractor as e\n"
        f"from densekit import {', '.join(PUBLIC_API)}\n"
        f"assert densekit.__file__.startswith({str(target)!r}), densekit.__file__\n"
        f"assert e.__file__.startswith({str(target)!r}), e.__file__\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("area", AREAS)
def test_areas_import_as_densekit_namespace(area: str) -> None:
    import importlib

    module = importlib.import_module(f"densekit.{area}")
    assert Path(module.__file__).resolve().parent == ROOT / area


def _command_paths() -> list[list[str]]:
    """Every command and command group of the CLI, from the typer app itself (the root is [])."""
    import typer.main

    from densekit.apps.cli import app

    def walk(command, path):
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("args", _command_paths(), ids=lambda a: " ".join(a) or "densekit")
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


def test_public_api_is_lazy_and_complete() -> None:
    """``import densekit`` imports no torch; each public name then resolves to the object its module defines."""
    code = (
        "import importlib, sys\n"
        "import densekit\n"
        "assert 'torch' not in sys.modules, 'import densekit imported torch'\n"
        f"from densekit import {', '.join(PUBLIC_API)}\n"
        f"assert set({PUBLIC_API!r}) <= set(densekit.__all__) <= set(dir(densekit))\n"
        "for name in densekit.__all__:\n"
        "    value = getattr(densekit, name)\n"
        "    if name != '__version__':\n"
        "        assert value is getattr(importlib.import_module(densekit._EXPORTS[name]), name), name\n"
        "try:\n"
        "    densekit.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('densekit.no_such_name did not raise AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_densekit_is_apps_api() -> None:
    import densekit

    assert Path(densekit.__file__).resolve() == ROOT / "apps" / "api" / "__init__.py"


def _package_dirs() -> dict[str, Path]:
    """pyproject's package-dir: import name -> folder (``densekit`` -> apps/api, ``densekit.serve`` -> serve...)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: (ROOT / folder).resolve() for name, folder in config.items()}


def _modules() -> dict[str, Path]:
    """Every densekit module by its import name, named through pyproject's package-dir mapping."""
    dirs = _package_dirs()
    mapped = set(dirs.values())
    modules = {}
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            # a sub-folder that pyproject maps to another name (apps/api is `densekit`) is named there
            if any(parent in mapped and parent != folder for parent in path.parents if folder in parent.parents):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """densekit modules that ``name`` imports anywhere in its file: top level, functions, TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(_cycle_through(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One closed path inside a strongly connected component, from its first module back to it."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to ``start``
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_import_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "densekit" in graph and "densekit.apps.cli" in graph and "densekit.serve.errors" in graph
    # cmd_export imports densekit.export.onnx only inside its command body
    assert "densekit.export.onnx" in graph["densekit.apps.cmd_export"]
    # and a made-up circle is found, with its path
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles() -> None:
    """No circle between densekit modules, imports inside functions included (they hide circles)."""
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_import_direction() -> None:
    """serve/ is the ground floor: it imports no other densekit area; nothing imports apps/ (or ``densekit``)."""
    allowed = {
        "serve": {"serve"},
        "train": {"serve", "train"},
        "retrieval": {"serve", "retrieval"},
        "export": {"serve", "train", "export"},
        "apps": set(AREAS),
    }
    modules = _modules()

    def area(name: str) -> str:
        return modules[name].relative_to(ROOT).parts[0]  # `densekit` itself is in apps/ (apps/api)

    bad = []
    for name, targets in import_graph().items():
        used = {area(t) for t in targets}
        if not used <= allowed[area(name)]:
            bad.append(f"{name} imports {sorted(t for t in targets if area(t) not in allowed[area(name)])}")
    assert not bad, "\n".join(bad)
