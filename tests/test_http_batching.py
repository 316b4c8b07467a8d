"""Dynamic batching in the HTTP feature service (issue 14 item 5), against a real uvicorn on loopback.

A recording wrapper around the ``pixels`` extractor makes each forward pass take a known time, so batches
form (requests queue while one runs) and their sizes can be checked.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from _http_server import running_server

from densekit.serve.errors import DensekitError
from densekit.serve.extractor import FeatureExtractor
from densekit.serve.http import Limits, create_app
from densekit.serve.http_batching import DynamicBatcher, QueueFull


class Recording:
    """``pixels`` features, each forward pass ``delay`` seconds long, its (batch size, input size) recorded."""

    def __init__(self, delay: float = 0.0) -> None:
        self.inner = FeatureExtractor("pixels")
        self.meta = self.inner.meta
        self.delay = delay
        self.calls: list[tuple[int, tuple[int, int]]] = []
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        return self.inner(frame, size)

    def batch(self, frames: list[np.ndarray], size: tuple[int, int] | None = None) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.delay)
            out = self.inner.batch(frames, size=size)
            self.calls.append((len(frames), tuple(out.shape[2:])))
            return out
        finally:
            with self._lock:
                self.running -= 1


def png(h: int, w: int, seed: int) -> tuple[bytes, np.ndarray]:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), img


def post_all(url: str, bodies: list[bytes], params: dict | None = None) -> list[httpx.Response]:
    def post(body: bytes) -> httpx.Response:
        return httpx.post(f"{url}/features", content=body, params=params, headers={"content-type": "image/png"},
                          timeout=60)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def npy(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.load(io.BytesIO(resp.content), allow_pickle=False)


def test_requests_that_arrive_together_run_as_one_batch() -> None:
    ex = Recording(delay=0.3)
    with running_server(create_app(ex, Limits(max_batch=8))) as url:
        imgs = [png(32, 48, seed=i) for i in range(12)]
        answers = post_all(url, [b for b, _ in imgs])
        for resp, (_, img) in zip(answers, imgs):
            np.testing.assert_array_equal(npy(resp), ex.inner(img))  # each equals the frame run alone
        stats = httpx.get(f"{url}/model").json()["batching"]
    sizes = [n for n, _ in ex.calls]
    assert sum(sizes) == 12 and max(sizes) >= 4 and max(sizes) <= 8, sizes
    assert len(sizes) <= 6, sizes  # not 12 forward passes
    assert ex.most_running == 1  # one forward pass at a time
    assert stats["max_batch"] == 8 and stats["max_queue"] == 32 and stats["stats"]["requests"] == 12


def test_a_batch_holds_one_input_size_and_resize_groups_by_size_after_resize() -> None:
    ex = Recording(delay=0.2)
    with running_server(create_app(ex, Limits(max_batch=8))) as url:
        a = [png(32, 48, seed=i) for i in range(4)]
        b = [png(40, 64, seed=10 + i) for i in range(4)]  # another size: other batches
        c = [png(64, 96, seed=20 + i) for i in range(3)]  # resize=48 -> 32x48: a's batches
        with ThreadPoolExecutor(11) as pool:
            futs = [pool.submit(httpx.post, f"{url}/features", content=body, timeout=60,
                                headers={"content-type": "image/png"}) for body, _ in a + b]
            futs += [pool.submit(httpx.post, f"{url}/features", content=body, params={"resize": 48}, timeout=60,
                                 headers={"content-type": "image/png"}) for body, _ in c]
            answers = [f.result() for f in futs]
    for resp, (_, img) in zip(answers[:8], a + b):
        np.testing.assert_array_equal(npy(resp), ex.inner(img))
    for resp, (_, img) in zip(answers[8:], c):
        np.testing.assert_array_equal(npy(resp), ex.inner(img, size=(32, 48)))
        assert resp.headers["x-input-size"] == "32,48"
    by_size: dict[tuple[int, int], int] = {}
    for n, hw in ex.calls:
        by_size[hw] = by_size.get(hw, 0) + n
    assert by_size == {(4, 6): 7, (5, 8): 4}  # feature maps of 32x48 and 40x64 inputs (pixels: stride 8)


def test_max_batch_1_is_one_request_per_forward_pass() -> None:
    ex = Recording(delay=0.05)
    # max_queue=8: the default (4 x max_batch = 4) would turn some of the 6 at once away with 503.
    with running_server(create_app(ex, Limits(max_batch=1, max_queue=8))) as url:
        answers = post_all(url, [png(32, 48, seed=i)[0] for i in range(6)])
    assert [r.status_code for r in answers] == [200] * 6
    assert [n for n, _ in ex.calls] == [1] * 6


def test_a_full_queue_is_503_with_retry_after() -> None:
    ex = Recording(delay=0.5)
    with running_server(create_app(ex, Limits(max_batch=1, max_queue=2))) as url:
        answers = post_all(url, [png(32, 48, seed=i)[0] for i in range(8)])
    codes = sorted(r.status_code for r in answers)
    assert codes.count(503) >= 3 and 200 in codes and set(codes) <= {200, 503}, codes
    full = next(r for r in answers if r.status_code == 503)
    assert int(full.headers["retry-after"]) >= 1
    assert "queue is full" in full.json()["detail"]


def test_no_request_waits_past_its_deadline() -> None:
    # Forward passes of 1.5 s and a deadline of 0.6 s: the first request's pass outlasts its deadline (504 at
    # 0.6 s, not 1.5 s); the queued ones are dropped before they reach the network.
    ex = Recording(delay=1.5)
    with running_server(create_app(ex, Limits(max_batch=1, deadline_s=0.6))) as url:
        answers = post_all(url, [png(32, 48, seed=i)[0] for i in range(3)])
        assert [r.status_code for r in answers] == [504] * 3
        assert max(r.elapsed.total_seconds() for r in answers) < 1.3  # not the 1.5 s of the forward pass
        assert "deadline" in answers[0].json()["detail"] and int(answers[0].headers["retry-after"]) >= 1
        time.sleep(1.2)  # the first pass finishes; nothing else was queued for the network
        assert len(ex.calls) == 1
        ex.delay = 0.0
        assert httpx.post(f"{url}/features", content=png(32, 48, seed=9)[0], timeout=30,
                          headers={"content-type": "image/png"}).status_code == 200


def test_openapi_documents_every_code_the_service_answers() -> None:
    app = create_app(FeatureExtractor("pixels"))
    responses = app.openapi()["paths"]["/features"]["post"]["responses"]
    assert set(responses) == {"200", "400", "408", "413", "415", "422", "429", "503", "504"}
    for code in ("429", "503", "504"):
        assert "Retry-After" in responses[code]["headers"]


def test_batcher_caps_pixels_and_falls_back_to_single_frames_on_bad_input() -> None:
    calls: list[int] = []

    def run(frames: list[np.ndarray], key: tuple[int, int]) -> np.ndarray:
        calls.append(len(frames))
        if any(f[0, 0, 0] == 255 for f in frames):  # a frame only the model can refuse
            raise DensekitError("bad frame")
        return np.stack([np.full((2, 1, 1), f[0, 0, 0], np.float32) for f in frames])

    async def main() -> tuple[list, list]:
        batcher = DynamicBatcher(run, max_batch=8, max_delay_s=0.05, max_batch_pixels=3 * 100 * 100)
        frames = [np.full((4, 4, 3), v, np.uint8) for v in (1, 2, 3, 4, 255)]
        res = await asyncio.gather(*(batcher.submit(f, (100, 100), 5) for f in frames), return_exceptions=True)
        big = DynamicBatcher(run, max_batch=1, max_queue=1)
        big_res = await asyncio.gather(*(big.submit(f, (8, 8), 5) for f in frames[:3]), return_exceptions=True)
        await batcher.aclose()
        await big.aclose()
        return res, big_res

    res, big_res = asyncio.run(main())
    assert [float(r[0, 0, 0]) for r in res[:4]] == [1, 2, 3, 4]
    assert isinstance(res[4], DensekitError)
    assert calls[:2] == [3, 2]  # 3 frames of 100x100 fit max_batch_pixels; the 2 left, one bad, ...
    assert calls[2:4] == [1, 1]  # ... run alone, so only the bad one fails
    assert sum(isinstance(r, QueueFull) for r in big_res) >= 1


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_delay_ms": 5000}, {"deadline_s": 0}, {"max_queue": 0}])
def test_invalid_batching_limits_are_one_line(bad: dict) -> None:
    with pytest.raises(DensekitError, match="invalid limits"):
        create_app(FeatureExtractor("pixels"), **bad)
