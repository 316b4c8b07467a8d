"""Slow, short, aborted and hostile clients against a real ``densekit serve`` on loopback (issue 15).

The server runs as a subprocess (its RSS is read from ``/proc``, its log is checked for tracebacks) with the
``pixels`` model, so requests cost no network time; raw sockets play the slow clients.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from _http_server import answer_of, bomb_png, rss_mb, running_server, serve_subprocess, slow_body

from densekit.serve.extractor import FeatureExtractor
from densekit.serve.http import Limits, create_app

pytestmark = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc")

BODY_TIMEOUT = 3.0


def good_png(h: int = 32, w: int = 48) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, object, str]]:
    with serve_subprocess("--body-timeout", str(BODY_TIMEOUT)) as started:
        yield started


def post_good(url: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/features", content=good_png(), headers={"content-type": "image/png"}, timeout=timeout)


def test_63_slow_bodies_do_not_starve_a_good_request(server) -> None:
    # The case: 63 connections each send 1 KB of a declared 100 KB body and wait. Before, uvicorn's
    # cap of 64 connections made every other client get 503 for as long as they waited.
    url, _, _ = server
    slow = [slow_body(url, 100_000, b"\0" * 1024) for _ in range(63)]
    try:
        time.sleep(0.3)
        start = time.monotonic()
        resp = post_good(url)
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - start < BODY_TIMEOUT  # answered while the slow bodies were still held
        # Every slow body is then answered 408 and closed once the body timeout has passed.
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda s: answer_of(s, BODY_TIMEOUT + 5), slow))
        assert answers == [(408, True)] * 63
    finally:
        for s in slow:
            s.close()


def test_short_body_on_a_held_socket_is_answered_within_the_timeout(server) -> None:
    url, _, _ = server
    s = slow_body(url, 5000, good_png()[:100])  # 100 of 5000 bytes, then the socket stays open
    try:
        start = time.monotonic()
        status, closed = answer_of(s, BODY_TIMEOUT + 5)
        took = time.monotonic() - start
    finally:
        s.close()
    assert (status, closed) == (408, True)
    assert BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 2


def test_a_half_sent_request_head_is_closed_within_the_timeout(server) -> None:
    # uvicorn has no header timeout of its own: a connection dripping header bytes was held forever.
    url, _, _ = server
    host, port = url.removeprefix("http://").rsplit(":", 1)
    import socket

    s = socket.create_connection((host, int(port)))
    try:
        s.sendall(b"POST /features HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        for _ in range(3):  # one more header byte each second: uvicorn's keep-alive timer would restart
            time.sleep(1.0)
            try:
                s.sendall(b"X")
            except OSError:
                break
        status, closed = answer_of(s, BODY_TIMEOUT + 5)
        took = time.monotonic() - start
    finally:
        s.close()
    assert closed and status is None
    assert took < BODY_TIMEOUT + 3


def test_aborted_bodies_are_one_log_line_not_a_traceback(server) -> None:
    url, _, log_path = server
    before = open(log_path).read()
    for _ in range(3):
        s = slow_body(url, 100_000, b"\0" * 2048)
        time.sleep(0.2)
        s.close()  # the client goes away mid-body
    time.sleep(0.5)
    assert post_good(url).status_code == 200
    new = open(log_path).read()[len(before):]
    assert "Traceback" not in new and "ClientDisconnect" not in new, new
    gone = [ln for ln in new.splitlines() if "disconnected after" in ln]
    assert len(gone) == 3, new
    assert "2048 of 100000 body bytes" in gone[0]


def test_16_decompression_bombs_at_once_cost_no_memory(server) -> None:
    # 105 KB of PNG that decode to 6000x6000x3 = 108 MB. The size in the header is checked before decoding:
    # before, each was decoded first (+128 MB each; 16 at once took the server to 3.7 GB).
    url, proc, _ = server
    bomb = bomb_png()
    assert len(bomb) < 200_000
    post_good(url)  # warm: the first request's allocations are not the bombs'
    rss0 = rss_mb(proc.pid)

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{url}/features", content=bomb, headers={"content-type": "image/png"}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(16)))
    grown = rss_mb(proc.pid) - rss0
    assert {r.status_code for r in answers} == {413}
    assert "6000x6000" in answers[0].json()["detail"]
    assert grown < 50, f"RSS grew {grown:.0f} MB"


def test_large_images_with_resize_decode_one_at_a_time(server) -> None:
    # With resize a 6000x6000 image is legitimate (36 M pixels, under max_pixels): it is decoded, but such
    # big decodes take turns, so 8 at once cost about one decode, not eight (8 x 108 MB).
    url, proc, _ = server
    bomb = bomb_png()
    post_good(url)
    rss0 = rss_mb(proc.pid)

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{url}/features", params={"resize": 64}, content=bomb,
                          headers={"content-type": "image/png"}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    grown = rss_mb(proc.pid) - rss0
    assert [r.status_code for r in answers] == [200] * 8
    assert grown < 450, f"RSS grew {grown:.0f} MB"  # one decode: 108 MB RGB plus Pillow's own buffers


def test_per_client_limit_is_429_for_that_client_only() -> None:
    # One address with per_client requests in progress gets 429 for more; another address is served.
    app = create_app(FeatureExtractor("pixels"), Limits(per_client=4, read_timeout_s=BODY_TIMEOUT))
    with running_server(app, Limits(read_timeout_s=BODY_TIMEOUT)) as url:
        held = [slow_body(url, 10_000, b"\0" * 100, source="127.0.0.2") for _ in range(4)]
        try:
            time.sleep(0.3)
            extra = slow_body(url, 10, b"\0" * 10, source="127.0.0.2")
            status, _ = answer_of(extra, 2)
            extra.close()
            assert status == 429
            resp = post_good(url)
            assert resp.status_code == 200, resp.text
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        # Once its requests are gone, that address is served again.
        again = slow_body(url, len(good_png()), good_png(), source="127.0.0.2")
        assert answer_of(again, 1.0)[0] == 200
        again.close()
