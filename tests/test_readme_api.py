"""The Python API block of README.md runs as written (on the tiny sample dataset it makes itself)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_readme_python_api_block_runs(tmp_path: Path) -> None:
    block = readme_api_block()
    assert "from densekit import" in block and len(block.splitlines()) <= 20
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("features (") and lines[1].startswith("tracked ") and " through 8 frames" in lines[1]
    jf = float(re.match(r"J&F (\S+) on ", lines[2])[1])
    assert 0.0 < jf <= 1.0
    assert lines[3].startswith("nearest segments: [(")
    assert (tmp_path / "runs" / "api-eval" / "global_results-val.csv").is_file()
