"""A real uvicorn server on a free loopback port, for the HTTP tests (not a test module)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from densekit.serve.http import Limits, uvicorn_config


@contextmanager
def running_server(app, limits: Limits | None = None, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields the base URL.

    The uvicorn settings are those ``densekit serve`` uses (:func:`uvicorn_config`), with ``limits``' timeouts
    and connection cap.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, limits, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --- abuse traffic against a real server (also used by benchmarks/http_load.py) ---------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_subprocess(*args: str, model: str = "pixels", log_path: str | None = None) -> Iterator[tuple[str, object, str]]:
    """``densekit serve --model MODEL ARGS`` in a fresh interpreter on a free loopback port.

    Yields (base URL, the Popen, the path of its stderr log). One torch thread (``OMP_NUM_THREADS=1``) so it
    shares a small machine politely. Its RSS: :func:`rss_mb` of ``proc.pid``.
    """
    import os
    import subprocess
    import sys
    import tempfile

    import httpx

    port = free_port()
    log_path = log_path or tempfile.mkstemp(prefix="densekit-serve-", suffix=".log")[1]
    code = "import sys; from densekit.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", model, "--port", str(port),
                                 "--log-level", "info", *args], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"densekit serve did not start: {open(log_path).read()[-2000:]}") from None
                time.sleep(0.2)
        yield url, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slow_body(url: str, declared: int, sent: bytes, *, source: str = "127.0.0.1",
              path: str = "/features", content_type: str = "image/png") -> socket.socket:
    """A connection that declares a ``declared``-byte body, sends only ``sent`` and then waits.

    ``source``: the local address to connect from (any 127.x.y.z is loopback on Linux), to act as another client.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    s.sendall(head + sent)
    return s


def answer_of(s: socket.socket, timeout: float) -> tuple[int | None, bool]:
    """(HTTP status of what the server sent, or None; whether it then closed the connection) within ``timeout``."""
    s.settimeout(0.2)
    data, closed, end = b"", False, time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, closed


def bomb_png(side: int = 6000) -> bytes:
    """An all-zero RGB PNG of ``side`` x ``side`` pixels: about 105 KB that decode to 108 MB at 6000."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
