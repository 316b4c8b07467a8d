"""The HTTP feature service against a real uvicorn server on a loopback port, and `densekit serve`."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from _http_server import running_server

from densekit.apps.cli import main
from densekit.serve.extractor import FeatureExtractor
from densekit.serve.http import create_app, is_loopback, resized_size

MAX_BYTES = 200_000
MAX_SIDE = 160


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, a few rectangles and mild noise: structure for features to see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (h + w) * 120 + 60], axis=-1)
    for _ in range(4):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("resnet18")


@pytest.fixture(scope="module")
def base_url(extractor: FeatureExtractor) -> Iterator[str]:
    with running_server(create_app(extractor, max_bytes=MAX_BYTES, max_side=MAX_SIDE)) as url:
        yield url


@pytest.fixture(scope="module")
def probe(extractor: FeatureExtractor) -> tuple[bytes, np.ndarray]:
    """A small good request body and its directly computed features (to check the server still works)."""
    img = make_image(24, 32, seed=5)
    return encode(img), extractor(img)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def load_npy(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    return np.load(io.BytesIO(resp.content), allow_pickle=False)


def test_npy_raw_body_round_trip_equals_direct_extraction(client: httpx.Client, extractor) -> None:
    img = make_image(43, 61)  # not multiples of the stride: the server must round exactly like the extractor
    resp = client.post("/features", content=encode(img), headers={"content-type": "image/png"})
    feats = load_npy(resp)
    expected = extractor(img)
    d = extractor.meta.dim
    assert extractor.meta.stride == 8
    assert feats.dtype == np.float32 and feats.shape == expected.shape == (d, 5, 7)
    np.testing.assert_allclose(feats, expected, rtol=0, atol=1e-6)
    assert resp.headers["x-feature-shape"] == f"{d},5,7"
    assert resp.headers["x-input-size"] == "40,56"
    np.testing.assert_allclose(np.linalg.norm(feats, axis=0), 1.0, atol=1e-4)


def test_npy_multipart_jpeg_with_resize(client: httpx.Client, extractor) -> None:
    img = make_image(90, 130, seed=1)
    data = encode(img, "JPEG", quality=90)
    resp = client.post(
        "/features", params={"resize": 64}, files={"image": ("frame.jpg", data, "image/jpeg")}
    )
    feats = load_npy(resp)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    size = resized_size(decoded.shape[:2], 64)
    assert size == (44, 64)
    np.testing.assert_allclose(feats, extractor(decoded, size=size), rtol=0, atol=1e-6)
    assert feats.shape == (extractor.meta.dim, 5, 8)


def test_grayscale_and_rgba_uploads_become_rgb(client: httpx.Client, extractor) -> None:
    img = make_image(32, 32, seed=2)
    gray = img[:, :, 0]
    feats = load_npy(client.post("/features", content=encode(gray), headers={"content-type": "image/png"}))
    np.testing.assert_allclose(feats, extractor(np.repeat(gray[:, :, None], 3, axis=2)), rtol=0, atol=1e-6)
    rgba = np.dstack([img, np.full(img.shape[:2], 7, np.uint8)])
    feats = load_npy(client.post("/features", content=encode(rgba), headers={"content-type": "image/png"}))
    np.testing.assert_allclose(feats, extractor(img), rtol=0, atol=1e-6)


def test_pca_png_sizes_and_first_component(client: httpx.Client, extractor) -> None:
    img = make_image(43, 61, seed=3)
    body = encode(img)
    resp = client.post("/features", params={"format": "pca"}, content=body, headers={"content-type": "image/png"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    pic = Image.open(io.BytesIO(resp.content))
    assert pic.format == "PNG" and pic.mode == "RGB" and pic.size == (61, 43)

    resp = client.post(
        "/features",
        params={"format": "pca", "pca_size": "features"},
        content=body,
        headers={"content-type": "image/png"},
    )
    small = np.asarray(Image.open(io.BytesIO(resp.content)))
    feats = extractor(img)
    assert small.shape == (feats.shape[1], feats.shape[2], 3)
    # Each channel is min-max scaled on its own, so each spans the full 0..255 range.
    assert (small.reshape(-1, 3).min(axis=0) == 0).all() and (small.reshape(-1, 3).max(axis=0) == 255).all()
    # Red is the first principal component: compare with the top eigenvector of the covariance.
    x = feats.reshape(feats.shape[0], -1).T.astype(np.float64)
    x -= x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)
    pc1 = x @ vecs[:, -1]
    corr = np.corrcoef(small[:, :, 0].reshape(-1).astype(np.float64), pc1)[0, 1]
    assert abs(corr) > 0.999
    # The upsampled picture is the small one with every feature cell as a block (nearest neighbour).
    big = np.asarray(pic)
    assert big[0, 0].tolist() == small[0, 0].tolist() and big[-1, -1].tolist() == small[-1, -1].tolist()


def test_health_and_model(client: httpx.Client, extractor) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    info = client.get("/model").json()
    meta = extractor.meta
    assert (info["name"], info["stride"], info["dim"], info["input_multiple"]) == (
        meta.name,
        meta.stride,
        meta.dim,
        meta.input_multiple,
    )
    assert info["mean"] == list(meta.mean) and info["std"] == list(meta.std)
    assert info["version"] == meta.version and info["arch"] == json.loads(json.dumps(meta.arch))
    assert info["backend"] == "torch" and info["provider"] and info["device"] == "cpu"
    assert info["limits"]["max_bytes"] == MAX_BYTES


def test_openapi_schema_lists_the_endpoints(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/features", "/health", "/model"} <= set(schema["paths"])
    body = schema["paths"]["/features"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/png" in body


def _multipart(fields: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    req = httpx.Request("POST", "http://x/", files=fields)
    return req.read(), req.headers["content-type"]


BAD_REQUESTS = [
    pytest.param({"content-type": "text/plain"}, b"hello", {}, 415, id="text-plain"),
    pytest.param({"content-type": "application/json"}, b'{"a": 1}', {}, 415, id="json"),
    pytest.param({}, b"\x89PNG", {}, 415, id="no-content-type"),
    pytest.param({"content-type": "image/png"}, b"", {}, 400, id="empty"),
    pytest.param({"content-type": "image/png"}, b"this is not an image at all", {}, 400, id="not-an-image"),
    pytest.param({"content-type": "image/png"}, "TRUNCATED", {}, 400, id="truncated-png"),
    pytest.param({"content-type": "image/png"}, "SVG", {}, 400, id="svg"),
    pytest.param({"content-type": "image/png"}, "TINY", {}, 422, id="smaller-than-stride"),
    pytest.param({"content-type": "image/png"}, "GOOD", {"resize": 0}, 422, id="resize-zero"),
    pytest.param({"content-type": "image/png"}, "GOOD", {"resize": 100000}, 422, id="resize-too-big"),
    pytest.param({"content-type": "image/png"}, "GOOD", {"format": "jpeg"}, 422, id="bad-format"),
    pytest.param({"content-type": "image/png"}, "WIDE", {}, 413, id="longer-side-above-max-side"),
    pytest.param(None, "MULTIPART-NOFILE", {}, 400, id="multipart-no-file"),
    pytest.param(None, "MULTIPART-TEXTFILE", {}, 400, id="multipart-not-image"),
    pytest.param({"content-type": "multipart/form-data; boundary=xyz"}, b"garbage", {}, 400, id="multipart-broken"),
]


def _body(spec: bytes | str) -> tuple[bytes, str | None]:
    good = encode(make_image(24, 32, seed=4))
    if isinstance(spec, bytes):
        return spec, None
    if spec == "TRUNCATED":
        return good[: len(good) // 2], None
    if spec == "SVG":
        return b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', None
    if spec == "TINY":
        return encode(make_image(4, 40)), None
    if spec == "GOOD":
        return good, None
    if spec == "WIDE":
        return encode(make_image(40, MAX_SIDE + 8)), None
    if spec == "MULTIPART-NOFILE":
        body = b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nnot a file\r\n--b--\r\n'
        return body, "multipart/form-data; boundary=b"
    if spec == "MULTIPART-TEXTFILE":
        return _multipart({"image": ("notes.txt", b"just text, no pixels", "text/plain")})
    raise AssertionError(spec)


@pytest.mark.parametrize(("headers", "spec", "params", "status"), BAD_REQUESTS)
def test_bad_input_is_4xx_json_and_server_keeps_serving(client: httpx.Client, probe, headers, spec, params, status) -> None:
    body, ctype = _body(spec)
    hdrs = headers if headers is not None else {"content-type": ctype}
    resp = client.post("/features", content=body, headers=hdrs, params=params)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    detail = resp.json()["detail"]
    assert detail and (isinstance(detail, list) or "\n" not in detail)
    ok = client.post("/features", content=probe[0], headers={"content-type": "image/png"})
    np.testing.assert_allclose(load_npy(ok), probe[1], rtol=0, atol=1e-6)


def test_wrong_method_is_405(client: httpx.Client) -> None:
    assert client.get("/features").status_code == 405


def test_size_limit_from_content_length(client: httpx.Client) -> None:
    resp = client.post("/features", content=b"\0" * (MAX_BYTES + 1), headers={"content-type": "image/png"})
    assert resp.status_code == 413
    assert str(MAX_BYTES) in resp.json()["detail"]
    assert client.get("/health").status_code == 200


def test_size_limit_on_streamed_body_without_content_length(client: httpx.Client) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(8):
            sent += 32_768
            yield b"\0" * 32_768

    resp = client.post("/features", content=chunks(), headers={"content-type": "image/png"})
    assert resp.status_code == 413, resp.text
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert "limit" in resp.json()["detail"]
    assert client.get("/health").status_code == 200


def test_concurrent_requests_are_serialised_and_correct(base_url: str, extractor) -> None:
    imgs = [make_image(24, 32, seed=10 + i) for i in range(4)]

    def post(img: np.ndarray) -> np.ndarray:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            return load_npy(c.post("/features", content=encode(img), headers={"content-type": "image/png"}))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(post, imgs))
    for img, feats in zip(imgs, results):
        np.testing.assert_allclose(feats, extractor(img), rtol=0, atol=1e-6)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_cli_serve_help_is_light() -> None:
    code = (
        "import sys\n"
        "from densekit.apps.cli import main\n"
        "assert main(['serve', '--help']) == 0\n"
        "heavy = [m for m in ('torch', 'timm', 'cv2', 'fastapi', 'uvicorn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout and "--max-bytes" in out.stdout and "--host" in out.stdout


def test_cli_serve_bad_model_is_one_line_exit_2(capsys) -> None:
    assert main(["serve", "--model", "no_such_backbone_or_file"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no_such_backbone_or_file" in err and "\n" not in err


def test_cli_serve_port_in_use_is_one_line_exit_2(capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "pixels", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot listen on 127.0.0.1:") and str(port) in err[-1]


@pytest.mark.slow  # a fresh interpreter imports torch: ~5 s idle, much more on a loaded machine
def test_cli_serve_starts_a_real_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from densekit.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--model", "pixels", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/model", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.communicate(timeout=5)) from None
                time.sleep(0.2)
        assert resp.json()["name"] == "pixels"
        img = make_image(32, 40)
        feats = np.load(io.BytesIO(httpx.post(
            f"http://127.0.0.1:{port}/features", content=encode(img), headers={"content-type": "image/png"}
        ).content))
        assert feats.shape == (192, 4, 5)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "warning" not in proc.stderr.read().decode().lower()


def test_http_module_imports_without_torch() -> None:
    # An ONNX Runtime / TensorRT deployment serves features with no torch installed.
    code = "import sys, densekit.serve.http; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
