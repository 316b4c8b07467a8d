"""Load and abuse on the HTTP feature service: requests/s and p50/p99 with and without dynamic batching.

Starts ``densekit serve`` twice on loopback (``--max-batch 8 --max-delay-ms 5``, then ``--max-batch 1``), one
torch thread each, and drives it with closed-loop clients (each posts the next image when its answer
arrives) at concurrency 1, 4 and 16 for ``--seconds`` per row. Then, on the batching server, the same load
with abuse beside it: 63 slow bodies (1 KB of a declared 100 KB, held), and 16 decompression bombs (all-zero
6000x6000 PNGs, 105 KB each) posted at once and again, with the server's RSS (``/proc/<pid>/status``) before
and after. Prints one table; the client threads share the machine with the server, so figures are relative.

Run: python benchmarks/http_load.py [--model resnet18] [--size 96,128] [--seconds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _http_server import bomb_png, rss_mb, serve_subprocess, slow_body  # noqa: E402


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    cores = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("CPU(s)")), "?")
    return f"{model}, {cores} CPUs"


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def load(url: str, body: bytes, concurrency: int, seconds: float) -> dict[str, object]:
    """Closed-loop clients for ``seconds``: req/s of 200s, p50/p99 latency (ms) of 200s, other codes."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < end:
                t = time.monotonic()
                r = c.post(f"{url}/features", content=body, headers={"content-type": "image/png"})
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        lat.append(time.monotonic() - t)

    before = httpx.get(f"{url}/model").json()["batching"]["stats"]
    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.monotonic() - start
    after = httpx.get(f"{url}/model").json()["batching"]["stats"]
    batches = after["batches"] - before["batches"]
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"rps": len(lat) / took, "p50": q[49] * 1000, "p99": q[98] * 1000,
            "other": {k: v for k, v in codes.items() if k != 200},
            "batch": (after["requests"] - before["requests"]) / batches if batches else float("nan")}


_BOMB: list[bytes] = []  # encoded once: a 6000x6000 PNG costs the client a second


def bombs(url: str, n: int = 16) -> list[int]:
    """``n`` bombs posted at once; their status codes."""
    bomb = _BOMB[0] if _BOMB else _BOMB.append(bomb_png()) or _BOMB[0]
    out: list[int] = []

    def post() -> None:
        out.append(httpx.post(f"{url}/features", content=bomb, headers={"content-type": "image/png"}, timeout=60)
                   .status_code)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def _row(label: str, conc: int, r: dict[str, object]) -> str:
    other = ",".join(f"{k}x{v}" for k, v in sorted(r["other"].items())) or "-"
    return f"| {label:<34} | {conc:>4} | {r['rps']:>7.1f} | {r['p50']:>7.1f} | {r['p99']:>7.1f} | {r['batch']:>5.2f} | {other} |"


def abuse_rows(url: str, pid: int, body: bytes, seconds: float) -> list[str]:
    rows, notes = [], []
    rss0 = rss_mb(pid)
    slow = [slow_body(url, 100_000, b"\0" * 1024) for _ in range(63)]
    try:
        time.sleep(0.3)
        rows.append(_row("batching + 63 slow bodies held", 4, load(url, body, 4, seconds)))
    finally:
        for s in slow:
            s.close()
    notes.append(f"RSS around the slow-body run: {rss0:.0f} -> {rss_mb(pid):.0f} MB")
    rss1 = rss_mb(pid)
    stop = time.monotonic() + seconds
    codes: list[int] = []

    def bomber() -> None:
        while time.monotonic() < stop:
            codes.extend(bombs(url))

    th = threading.Thread(target=bomber)
    th.start()
    rows.append(_row("batching + 16 bombs at once, repeated", 4, load(url, body, 4, seconds)))
    th.join()
    notes.append(f"RSS around the bomb run ({len(codes)} bombs, codes {sorted(set(codes))}): "
                 f"{rss1:.0f} -> {rss_mb(pid):.0f} MB")
    return rows + notes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", default="96,128", help="H,W of the posted image")
    p.add_argument("--seconds", type=float, default=3.0, help="per row")
    p.add_argument("--concurrency", default="1,4,16")
    a = p.parse_args()
    h, w = (int(x) for x in a.size.split(","))
    body = _png(h, w)
    concs = [int(c) for c in a.concurrency.split(",")]
    print(f"# densekit serve --model {a.model}, {w}x{h} PNG, {a.seconds:g} s per row, 1 torch thread; {_cpu()}; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print("| server | conc | req/s | p50 ms | p99 ms | batch | other codes |")
    print("|---|---|---|---|---|---|---|")
    lines: list[str] = []
    for label, args in (("batching (--max-batch 8, 5 ms)", ["--max-batch", "8", "--max-delay-ms", "5"]),
                        ("no batching (--max-batch 1)", ["--max-batch", "1"])):
        with serve_subprocess(*args, "--log-level", "warning", model=a.model) as (url, proc, _):
            load(url, body, 1, min(1.0, a.seconds))  # warm-up
            for c in concs:
                print(_row(label, c, load(url, body, c, a.seconds)), flush=True)
            if args[1] == "8":
                lines = abuse_rows(url, proc.pid, body, a.seconds)
                for ln in lines:
                    if ln.startswith("|"):
                        print(ln, flush=True)
    for ln in lines:
        if not ln.startswith("|"):
            print(ln)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
