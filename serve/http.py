"""An HTTP feature service: post an image, get its dense features (``.npy``) or a PCA picture (PNG).

Built with FastAPI (the OpenAPI schema at ``/openapi.json`` and docs at ``/docs`` are FastAPI's own)
and served by uvicorn (``densekit serve``). :func:`create_app` is a factory over any feature extractor,
so tests start the real app in-process on a loopback port.

Endpoints:

``POST /features``
    The image comes either as a raw body with an image content type (``image/png``, ``image/jpeg``,
    ``image/webp``, ``image/bmp``, ``image/tiff``, ``image/gif``, any other ``image/*``, or
    ``application/octet-stream``), or as a ``multipart/form-data`` upload (field ``image``; the first
    file part is used whatever its name). The pixels are decoded by sniffing the bytes (the declared
    image type need not match), the first frame of animated/multi-page files is used, grayscale and
    palette images become RGB, alpha is dropped and EXIF orientation is not applied, exactly like
    :func:`densekit.serve.imageio.read_image` does for files.

    Query parameters:

    - ``format=npy`` (default): ``application/octet-stream``, a NumPy ``.npy`` file holding the float32
      ``(D, h, w)`` features, L2-normalised over D -- the very array ``extractor(frame, size)`` returns.
      Headers ``X-Feature-Shape: D,h,w`` and ``X-Input-Size: H,W`` (the size the network saw, after
      ``resize`` and rounding down to the model's input multiple).
    - ``format=pca``: ``image/png``, an RGB picture of the first three principal components of the
      features: the h*w feature vectors are centred and projected on the top three right singular
      vectors (``numpy.linalg.svd``), each component's sign is fixed so its largest loading is positive
      (deterministic, as scikit-learn's ``svd_flip``), and each channel is min-max scaled to 0..255
      separately. ``pca_size=input`` (default) upsamples the picture to the image size (after
      ``resize``), with nearest-neighbour interpolation so every feature cell stays a visible block;
      ``pca_size=features`` returns it at feature resolution (w x h pixels).
    - ``resize=N``: scale the image so its longer side is N pixels (aspect ratio kept; up or down)
      before feature extraction. Bounded by the server's ``max_side``; images whose longer side is
      above ``max_side`` must pass ``resize`` (413 otherwise), so one request cannot ask for an
      arbitrarily large forward pass.

``GET /health``
    ``{"status": "ok"}`` while the process serves requests.

``GET /model``
    The model's metadata contract (:class:`~densekit.serve.contract.ModelMeta` fields) plus ``backend``,
    ``provider`` and ``device`` (what really runs the network), and the server limits.

Bad input never reaches the user as a traceback: an empty body, a body that is not a decodable image
(400), a content type that is not an image or multipart (415), a body above ``max_bytes`` (413), an
image with too many pixels (413), parameters out of range (422), a full inference queue (503) all
answer with JSON ``{"detail": "<one line>"}`` and the server keeps serving.

Concurrency: the event loop only reads bodies. Decoding and PCA run in anyio's worker threads; the
forward pass runs in a worker thread behind a ``CapacityLimiter(1)``, i.e. one forward pass at a time.
Torch modules are not meant to be called from several threads at once (autograd/inference-mode
state and the intra-op thread pool are per process, and concurrent calls oversubscribe the CPU
instead of running faster), and ONNX Runtime/TensorRT sessions are cheapest used serially too; the
extractor batches internally if it wants throughput. At most ``max_queue`` requests wait for the
forward pass; beyond that the server answers 503 with ``Retry-After`` instead of queueing without
bound.

The request size limit is enforced on the bytes actually streamed in (a missing or lying
``Content-Length`` does not help), and early from ``Content-Length`` when it is declared.
"""


import io
import json
import logging
from enum import Enum
from typing import Annotated, Any, Protocol

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from densekit.serve.contract import ModelMeta, __version__
from densekit.serve.errors import DensekitError, one_line

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_SIDE = 2048
# A decoded image may be far larger than its compressed bytes (a "decompression bomb"); cap pixels.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_QUEUE = 8
MIN_RESIZE = 16

RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff", "image/gif")
# What Pillow is allowed to decode: common photo formats only, not every exotic plugin it ships.
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM"}


class Extractor(Protocol):
    """What the service needs from :class:`densekit.serve.extractor.FeatureExtractor`."""

    meta: ModelMeta

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray: ...


class OutputFormat(str, Enum):
    npy = "npy"
    pca = "pca"


class PcaSize(str, Enum):
    input = "input"
    features = "features"


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"title": "Detail"}},
    "required": ["detail"],
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


_BINARY = {"type": "string", "format": "binary"}
_REQUEST_BODY = {
    "required": True,
    "description": "The image: a raw body with an image content type, or a multipart upload (field `image`).",
    "content": {
        **{t: {"schema": _BINARY} for t in RAW_IMAGE_TYPES},
        "application/octet-stream": {"schema": _BINARY},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {**_BINARY, "description": "the image file"}},
                "required": ["image"],
            },
            "encoding": {"image": {"contentType": "image/*, application/octet-stream"}},
        },
    },
}


def model_info(extractor: Any) -> dict[str, Any]:
    """The metadata contract plus what really runs it: ``backend``, ``provider``, ``device``.

    Reads ``backend_name``/``provider``/``device`` of :class:`FeatureExtractor`; falls back to the
    backend object's ``name`` (or class name) for other extractors.
    """
    info: dict[str, Any] = json.loads(extractor.meta.to_json())  # exactly the contract JSON, plus:
    backend = getattr(extractor, "backend", None)
    if getattr(extractor, "backend_name", None):
        backend_name = extractor.backend_name
    elif isinstance(backend, str):
        backend_name = backend
    elif backend is not None:
        backend_name = getattr(backend, "name", None) or type(backend).__name__.lower().removesuffix("backend")
    else:
        backend_name = "unknown"
    device = getattr(extractor, "device", None)
    provider = getattr(extractor, "provider", None) or getattr(backend, "provider", None)
    if provider is None:
        provider = str(device) if device is not None else "unknown"
    info["backend"] = str(backend_name)
    info["provider"] = provider if isinstance(provider, (str, list)) else str(provider)
    info["device"] = None if device is None else str(device)
    return info


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of an image file -> ``(H, W, 3)`` uint8 RGB (first frame; conventions of ``read_image``).

    Raises:
        HTTPException: 400 (not a decodable image), 415 (a format outside :data:`ALLOWED_FORMATS`),
            413 (more than ``max_pixels`` pixels).
    """
    from PIL import Image, UnidentifiedImageError

    from densekit.serve.imageio import _image_to_rgb

    try:
        # Only the decoders of common photo formats get to see untrusted bytes.
        Image.init()  # registers every plugin, so the format names below are known
        im = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS & set(Image.OPEN)))
    except UnidentifiedImageError:
        raise HTTPException(400, "the body is not an image that can be decoded (PNG, JPEG, WebP, BMP, TIFF, GIF)")
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"image has too many pixels: {one_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - any decoder failure on user bytes is bad input
        raise HTTPException(400, f"the image could not be decoded: {one_line(exc)}")
    with im:
        if im.format not in ALLOWED_FORMATS:
            raise HTTPException(415, f"unsupported image format {im.format}; send PNG, JPEG, WebP, BMP, TIFF or GIF")
        w, h = im.size
        if w * h > max_pixels:
            raise HTTPException(413, f"image is {w}x{h} pixels, more than this server's limit of {max_pixels}")
        if w < 1 or h < 1:
            raise HTTPException(400, f"image is {w}x{h} pixels")
        try:
            im.load()
            return _image_to_rgb(im, "upload")
        except DensekitError as exc:
            raise HTTPException(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data fails in load()
            raise HTTPException(400, f"the image could not be decoded: {one_line(exc)}")


def resized_size(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(H, W) scaled so the longer side is ``max_side`` (aspect kept, each side at least 1)."""
    h, w = hw
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def pca_rgb(feats: np.ndarray) -> np.ndarray:
    """``(D, h, w)`` features -> ``(h, w, 3)`` uint8: the first three principal components as RGB.

    Centre the h*w vectors, SVD, project on the top three right singular vectors; flip each
    component's sign so its largest-magnitude loading is positive (scikit-learn's ``svd_flip``
    convention, so the picture does not change colour between identical calls); min-max each channel
    to 0..255 on its own. Missing components (D < 3 or fewer than 3 cells) and constant channels are 0.
    """
    d, h, w = feats.shape
    x = feats.reshape(d, h * w).T.astype(np.float64)
    x -= x.mean(axis=0, keepdims=True)
    proj = np.zeros((h * w, 3))
    if x.size and np.any(x):
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        k = min(3, vt.shape[0])
        comps = vt[:k]
        signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
        comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
        proj[:, :k] = x @ comps.T
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    span = hi - lo
    scaled = np.where(span > 1e-12, (proj - lo) / np.where(span > 1e-12, span, 1.0), 0.0)
    return np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(h, w, 3)


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


async def read_body_limited(request: Request, max_bytes: int) -> bytes:
    """The request body, failing with 413 as soon as more than ``max_bytes`` have streamed in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length header {declared!r}")
        if n > max_bytes:
            raise HTTPException(413, f"request body of {n} bytes exceeds this server's limit of {max_bytes} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise HTTPException(413, f"request body exceeds this server's limit of {max_bytes} bytes")
    return bytes(buf)


async def image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image file's bytes from a raw image body or a multipart upload (415/400 otherwise)."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    is_raw = media.startswith("image/") or media == "application/octet-stream"
    is_multipart = media == "multipart/form-data"
    if not (is_raw or is_multipart):
        shown = media or "no content type"
        raise HTTPException(
            415, f"unsupported content type ({shown}); send an image/* body or a multipart/form-data upload"
        )
    body = await read_body_limited(request, max_bytes)
    if not body:
        raise HTTPException(400, "empty request body: send an image")
    if is_raw:
        return body
    return await _multipart_file(request, body)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay():
        yield body
        yield b""

    # The body is already bounded by read_body_limited; parse it from memory.
    parser = MultiPartParser(request.headers, replay(), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed multipart body: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - the multipart parser on hostile input
        raise HTTPException(400, f"malformed multipart body: {one_line(exc)}")
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "multipart body has no file part; upload the image as field 'image'")
        preferred = form.get("image")
        upload = preferred if isinstance(preferred, UploadFile) else files[0]
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise HTTPException(400, "the uploaded image file is empty")
    return data


def create_app(
    extractor: Extractor,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """A FastAPI app serving ``extractor`` (see the module docstring for the endpoints).

    Args:
        extractor: a :class:`~densekit.serve.extractor.FeatureExtractor` (or anything with ``.meta`` and
            ``__call__(frame, size=None) -> (D, h, w)``).
        max_bytes: largest request body accepted (413 above it).
        max_side: largest longer image side fed to the network; also the upper bound of ``resize``.
        max_pixels: largest decoded image (width * height) accepted.
        max_queue: requests allowed in or waiting for the forward pass; more get 503.
    """
    if max_bytes < 1 or max_side < MIN_RESIZE or max_pixels < 1 or max_queue < 1:
        raise DensekitError(
            f"invalid limits: max_bytes={max_bytes}, max_side={max_side} (>= {MIN_RESIZE}), "
            f"max_pixels={max_pixels}, max_queue={max_queue}"
        )
    meta = extractor.meta
    info = model_info(extractor)
    info["limits"] = {"max_bytes": max_bytes, "max_side": max_side, "max_pixels": max_pixels}
    limiter = anyio.CapacityLimiter(1)  # one forward pass at a time (module docstring: why)
    in_flight = 0  # requests running or waiting for the forward pass; only touched on the event loop

    app = FastAPI(
        title="densekit feature service",
        version=__version__,
        description=(
            f"Dense features of `{meta.name}` (D={meta.dim}, stride {meta.stride}). "
            "POST an image to /features; get a float32 (D, h, w) .npy or a PCA-as-RGB PNG."
        ),
    )

    @app.exception_handler(DensekitError)
    async def _densekit_error(_: Request, exc: DensekitError) -> JSONResponse:
        # Bad input that only the extractor can detect (e.g. an image smaller than the input multiple).
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/health", summary="Liveness check")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model", summary="Model metadata contract, backend and provider")
    async def model() -> dict[str, Any]:
        return info

    def _forward(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
        return np.asarray(extractor(frame, size=size), dtype=np.float32)

    @app.post(
        "/features",
        summary="Dense features of one image",
        response_class=Response,
        openapi_extra={"requestBody": _REQUEST_BODY},
        responses={
            200: {
                "description": "format=npy: float32 (D, h, w) .npy; format=pca: RGB PNG",
                "content": {"application/octet-stream": {"schema": _BINARY}, "image/png": {"schema": _BINARY}},
            },
            400: _error("empty body, not a decodable image, malformed multipart"),
            413: _error("body or image too large"),
            415: _error("unsupported content type or image format"),
            422: _error("invalid parameters, or an image the model cannot take"),
            503: _error("inference queue full; retry later"),
        },
    )
    async def features(
        request: Request,
        format: Annotated[OutputFormat, Query(description="npy: float32 features; pca: PCA-as-RGB PNG")] = (
            OutputFormat.npy
        ),
        resize: Annotated[
            int | None,
            Query(ge=MIN_RESIZE, le=max_side, description="scale so the longer side is this many pixels"),
        ] = None,
        pca_size: Annotated[
            PcaSize, Query(description="format=pca only: picture at the image size or at feature resolution")
        ] = PcaSize.input,
    ) -> Response:
        nonlocal in_flight
        data = await image_bytes(request, max_bytes)
        frame = await anyio.to_thread.run_sync(decode_image, data, max_pixels)
        hw = (int(frame.shape[0]), int(frame.shape[1]))
        if resize is not None:
            size: tuple[int, int] | None = resized_size(hw, resize)
        elif max(hw) > max_side:
            raise HTTPException(
                413, f"image is {hw[1]}x{hw[0]}; its longer side exceeds {max_side}: pass resize=<= {max_side}"
            )
        else:
            size = None
        shown = size or hw
        m = meta.input_multiple
        if shown[0] < m or shown[1] < m:
            raise HTTPException(
                422, f"image of {shown[1]}x{shown[0]} is smaller than the model's input multiple {m} on a side"
            )
        if in_flight >= max_queue:
            raise HTTPException(503, "inference queue is full; retry later", headers={"Retry-After": "1"})
        in_flight += 1
        try:
            feats = await anyio.to_thread.run_sync(_forward, frame, size, limiter=limiter)
        finally:
            in_flight -= 1
        d, fh, fw = feats.shape
        # A static-shape export (``export onnx --static``) resizes every frame to its one input size.
        fixed = getattr(extractor, "fixed_hw", None)
        net_h, net_w = fixed if fixed else (shown[0] // m * m, shown[1] // m * m)
        headers = {"X-Feature-Shape": f"{d},{fh},{fw}", "X-Input-Size": f"{net_h},{net_w}"}
        if format is OutputFormat.npy:
            body = await anyio.to_thread.run_sync(encode_npy, feats)
            return Response(body, media_type="application/octet-stream", headers=headers)
        out_hw = shown if pca_size is PcaSize.input else (fh, fw)
        body = await anyio.to_thread.run_sync(_pca_png, feats, out_hw)
        return Response(body, media_type="image/png", headers=headers)

    return app


def _pca_png(feats: np.ndarray, out_hw: tuple[int, int]) -> bytes:
    import cv2

    rgb = pca_rgb(feats)
    if rgb.shape[:2] != tuple(out_hw):
        rgb = cv2.resize(rgb, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST)
    return encode_png(np.ascontiguousarray(rgb))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    extractor: Extractor,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    log_level: str = "info",
) -> None:
    """Run the service with uvicorn until interrupted (blocking).

    The listening socket is opened here, so a port in use or an address this machine does not have is
    a one-line :class:`DensekitError` rather than uvicorn's log line and ``sys.exit(1)``.
    """
    import socket

    import uvicorn

    app = create_app(extractor, max_bytes, max_side=max_side)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family)
    except OSError as exc:
        raise DensekitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # limit_concurrency: uvicorn answers 503 itself beyond this many open connections/tasks.
    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=64, timeout_keep_alive=5)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    # Config() has set up uvicorn's loggers; with our own socket uvicorn does not print the address.
    logging.getLogger("uvicorn.error").info("densekit feature service on http://%s:%d (docs at /docs)", shown, bound_port)
    with sock:
        uvicorn.Server(config).run(sockets=[sock])


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_SIDE",
    "create_app",
    "decode_image",
    "is_loopback",
    "model_info",
    "pca_rgb",
    "serve",
]
