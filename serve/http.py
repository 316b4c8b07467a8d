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
    ``provider`` and ``device`` (what really runs the network), the server limits, and the batching
    settings with live counters (``batching.stats``: batches run and their sizes).

Bad input never reaches the user as a traceback: an empty body, a body that is not a decodable image
(400), a content type that is not an image or multipart (415), a body above ``max_bytes`` (413), an
image with too many pixels (413), parameters out of range or an image smaller than the model's input
multiple (422) all answer with JSON ``{"detail": "<one line>"}`` and the server keeps serving. Overload
and slow clients (all JSON too): a body not received within ``read_timeout`` (408, connection closed),
more than ``per_client`` requests in progress from one address (429), a full batching queue (503 with
``Retry-After``), no answer within the request's ``deadline`` (504 with ``Retry-After``).

Images are checked before they are decoded: Pillow opens lazily, so the size in the header is compared
with ``max_pixels`` and ``max_side`` (without ``resize``) before a single pixel is decoded, and a
decompression bomb (a 100 KB PNG of 6000x6000 zeros) costs nothing. Images above 2048x2048 pixels (only
reachable with ``resize``) decode one at a time, so their memory does not add up.

Concurrency: the event loop only reads bodies. Decoding and PCA run in anyio's worker threads; the
forward pass runs in one dedicated thread, fed by a dynamic batcher (:mod:`densekit.serve.http_batching`):
requests that arrive within ``max_delay_ms`` of each other and resize to the same network input size run
as one batch of up to ``max_batch`` frames. Slow and aborted requests: :mod:`densekit.serve.http_guard`.
"""


import contextlib
import dataclasses
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Annotated, Any, Protocol

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from densekit.serve.contract import ModelMeta, __version__
from densekit.serve.errors import DensekitError, one_line
from densekit.serve.http_batching import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_DELAY_S,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
)
from densekit.serve.http_guard import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PER_CLIENT,
    DEFAULT_READ_TIMEOUT_S,
    ClientGone,
    PerClientLimit,
    read_body,
    timed_h11,
)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_SIDE = 2048
# A decoded image may be far larger than its compressed bytes (a "decompression bomb"); cap pixels.
DEFAULT_MAX_PIXELS = 40_000_000
# Images above this many pixels decode one at a time (each may take up to max_pixels * 3 bytes).
BIG_DECODE_PIXELS = 2048 * 2048
MIN_RESIZE = 16

RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff", "image/gif")
# What Pillow is allowed to decode: common photo formats only, not every exotic plugin it ships.
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM"}

log = logging.getLogger("uvicorn.error")


class Extractor(Protocol):
    """What the service needs from :class:`densekit.serve.extractor.FeatureExtractor`.

    ``batch(frames, size)`` is used when present (one forward pass for a batch); otherwise each frame
    goes through ``__call__``.
    """

    meta: ModelMeta

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class Limits:
    """The service's limits (all in ``GET /model``; ``densekit serve`` options of the same names).

    max_bytes: largest request body (413). max_side: largest longer side fed to the network, and the bound
    of ``resize``. max_pixels: largest image (width * height) decoded (413). read_timeout_s: time for the
    request head after connecting, and for the body after the head (408). per_client: requests in progress
    per client address (429). max_connections: open connections in all (uvicorn answers 503 beyond).
    max_batch, max_delay_ms, max_queue: dynamic batching (None: ``4 * max_batch``; 503 beyond).
    deadline_s: longest from the request head to the answer (504).
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    per_client: int = DEFAULT_PER_CLIENT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_batch: int = DEFAULT_MAX_BATCH
    max_delay_ms: float = DEFAULT_MAX_DELAY_S * 1000
    max_queue: int | None = None
    deadline_s: float = DEFAULT_DEADLINE_S

    def check(self) -> None:
        """Raise DensekitError (one line) for a limit out of range."""
        bad = [f"{k}={v}" for k, v, ok in (
            ("max_bytes", self.max_bytes, self.max_bytes >= 1),
            ("max_side", self.max_side, self.max_side >= MIN_RESIZE),
            ("max_pixels", self.max_pixels, self.max_pixels >= 1),
            ("read_timeout", self.read_timeout_s, self.read_timeout_s > 0),
            ("per_client", self.per_client, self.per_client >= 1),
            ("max_connections", self.max_connections, self.max_connections >= 1),
            ("max_batch", self.max_batch, self.max_batch >= 1),
            ("max_delay_ms", self.max_delay_ms, 0 <= self.max_delay_ms <= 1000),
            ("max_queue", self.max_queue, self.max_queue is None or self.max_queue >= 1),
            ("deadline", self.deadline_s, self.deadline_s > 0),
        ) if not ok]
        if bad:
            raise DensekitError(f"invalid limits: {', '.join(bad)} (sizes >= 1, max_side >= {MIN_RESIZE}, "
                                "times > 0, max_delay_ms 0..1000)")


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
_RETRY_AFTER = {"Retry-After": {"description": "seconds after which a retry is likely to succeed",
                                "schema": {"type": "integer", "minimum": 1}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    if headers:
        out["headers"] = headers
    return out


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
_FEATURE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "format=npy: float32 (D, h, w) .npy; format=pca: RGB PNG",
        "content": {"application/octet-stream": {"schema": _BINARY}, "image/png": {"schema": _BINARY}},
    },
    400: _error("empty body, not a decodable image, malformed multipart, invalid Content-Length"),
    408: _error("the body did not arrive within the server's read timeout; the connection is closed"),
    413: _error("body too large, image with too many pixels, or longer side above max_side without resize"),
    415: _error("unsupported content type or image format"),
    422: _error("invalid parameters, or an image smaller than the model's input multiple on a side "
                "(after resize), which no schema for a binary body can express"),
    429: _error("too many requests in progress from this client address", _RETRY_AFTER),
    503: _error("inference queue full; retry after Retry-After seconds", _RETRY_AFTER),
    504: _error("no answer within the server's per-request deadline; retry after Retry-After seconds",
               _RETRY_AFTER),
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


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Any:
    """Bytes of an image file -> a lazily opened PIL image, its size checked before any pixel is decoded.

    Pillow's ``open`` reads only the header, so a decompression bomb is refused here at no cost. Pillow's
    own guard (``Image.MAX_IMAGE_PIXELS``, a process-wide setting shared with all other code, left alone)
    raises ``DecompressionBombError`` only above twice its 89 M pixel default; ``max_pixels`` is stricter.

    Args:
        max_side: when given, a longer side above it is refused too (a request without ``resize``).

    Raises:
        HTTPException: 400 (not a decodable image), 415 (a format outside :data:`ALLOWED_FORMATS`),
            413 (more than ``max_pixels`` pixels, or a side above ``max_side``).
    """
    from PIL import Image, UnidentifiedImageError

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
    try:
        if im.format not in ALLOWED_FORMATS:
            raise HTTPException(415, f"unsupported image format {im.format}; send PNG, JPEG, WebP, BMP, TIFF or GIF")
        w, h = im.size
        if w * h > max_pixels:
            raise HTTPException(413, f"image is {w}x{h} pixels, more than this server's limit of {max_pixels}")
        if max_side is not None and max(w, h) > max_side:
            raise HTTPException(413, f"image is {w}x{h}; its longer side exceeds {max_side}: pass resize=<= {max_side}")
        if w < 1 or h < 1:
            raise HTTPException(400, f"image is {w}x{h} pixels")
    except BaseException:
        im.close()
        raise
    return im


def load_rgb(im: Any) -> np.ndarray:
    """Decode an image from :func:`open_image` -> ``(H, W, 3)`` uint8 RGB (conventions of ``read_image``).

    Closes ``im``. Raises HTTPException 400 for truncated or corrupt data.
    """
    from densekit.serve.imageio import _image_to_rgb

    with im:
        try:
            im.load()
            return _image_to_rgb(im, "upload")
        except DensekitError as exc:
            raise HTTPException(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data fails in load()
            raise HTTPException(400, f"the image could not be decoded: {one_line(exc)}")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> np.ndarray:
    """Bytes of an image file -> ``(H, W, 3)`` uint8 RGB: :func:`open_image` then :func:`load_rgb`."""
    return load_rgb(open_image(data, max_pixels, max_side))


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


async def image_bytes(request: Request, max_bytes: int, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
    """The image file's bytes from a raw image body or a multipart upload (415/400 otherwise).

    The body is read with :func:`densekit.serve.http_guard.read_body` (413 past ``max_bytes``, 408 past
    ``timeout_s``, :class:`ClientGone` when the client leaves mid-body).
    """
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    is_raw = media.startswith("image/") or media == "application/octet-stream"
    is_multipart = media == "multipart/form-data"
    if not (is_raw or is_multipart):
        shown = media or "no content type"
        raise HTTPException(
            415, f"unsupported content type ({shown}); send an image/* body or a multipart/form-data upload"
        )
    body = await read_body(request, max_bytes, timeout_s)
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


def batch_runner(extractor: Extractor) -> Any:
    """``(frames, (H, W)) -> (B, D, h, w)`` for the batcher: ``extractor.batch`` if it has one.

    Every frame is resized to ``(H, W)``, the size it would have been resized to alone (``resize`` and
    rounding to the input multiple), so each result equals ``extractor(frame, size)``.
    """
    batch = getattr(extractor, "batch", None)
    if callable(batch):
        return lambda frames, key: batch(frames, size=key)
    return lambda frames, key: np.stack([np.asarray(extractor(f, size=key)) for f in frames])


class _Service:
    """The state behind ``POST /features``: limits, the batcher, the decode limiter."""

    def __init__(self, extractor: Extractor, limits: Limits) -> None:
        self.extractor, self.limits = extractor, limits
        self.batcher = DynamicBatcher(batch_runner(extractor), max_batch=limits.max_batch,
                                      max_delay_s=limits.max_delay_ms / 1000, max_queue=limits.max_queue)
        self.big_decode = anyio.CapacityLimiter(1)  # module docstring: large images decode one at a time

    def plan(self, hw: tuple[int, int], resize: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
        """(image size after ``resize``, network input size) for an image of ``hw``; 422 if too small.

        The longer-side check without ``resize`` was done on the header by :func:`open_image`.
        """
        shown = resized_size(hw, resize) if resize is not None else hw
        m = self.extractor.meta.input_multiple
        if shown[0] < m or shown[1] < m:
            raise HTTPException(
                422, f"image of {shown[1]}x{shown[0]} is smaller than the model's input multiple {m} on a side"
            )
        # A static-shape export (``export onnx --static``) resizes every frame to its one input size.
        fixed = getattr(self.extractor, "fixed_hw", None)
        net = (int(fixed[0]), int(fixed[1])) if fixed else (shown[0] // m * m, shown[1] // m * m)
        return shown, net

    async def frame(self, data: bytes, resize: int | None) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Decode the upload, sizes checked on its header first -> (frame, shown size, network size)."""
        lim = self.limits
        im = await anyio.to_thread.run_sync(open_image, data, lim.max_pixels, None if resize else lim.max_side)
        try:
            shown, net = self.plan((im.size[1], im.size[0]), resize)
        except BaseException:
            im.close()
            raise
        big = im.size[0] * im.size[1] > BIG_DECODE_PIXELS
        frame = await anyio.to_thread.run_sync(load_rgb, im, limiter=self.big_decode if big else None)
        return frame, shown, net

    async def features(self, frame: np.ndarray, net: tuple[int, int], started: float) -> np.ndarray:
        """``(D, h, w)`` features through the batcher; 503 (queue full) / 504 (deadline) as HTTP errors."""
        left = self.limits.deadline_s - (time.monotonic() - started)
        try:
            if left <= 0:
                raise DeadlineExceeded(f"no answer within this server's deadline of {self.limits.deadline_s:g} s")
            return await self.batcher.submit(frame, net, left)
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
        except DeadlineExceeded as exc:
            raise HTTPException(504, str(exc), headers={"Retry-After": str(self.batcher.retry_after())})

    def info(self) -> dict[str, Any]:
        return {**self.batcher.config(), "stats": self.batcher.stats.as_dict()}


async def _respond(feats: np.ndarray, fmt: OutputFormat, out_hw: tuple[int, int],
                   net: tuple[int, int]) -> Response:
    d, fh, fw = feats.shape
    headers = {"X-Feature-Shape": f"{d},{fh},{fw}", "X-Input-Size": f"{net[0]},{net[1]}"}
    if fmt is OutputFormat.npy:
        body = await anyio.to_thread.run_sync(encode_npy, feats)
        return Response(body, media_type="application/octet-stream", headers=headers)
    body = await anyio.to_thread.run_sync(_pca_png, feats, out_hw)
    return Response(body, media_type="image/png", headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DensekitError)
    async def _densekit_error(_: Request, exc: DensekitError) -> JSONResponse:
        # Bad input that only the extractor can detect (e.g. an image smaller than the input multiple).
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, exc: ClientGone) -> Response:
        # One line instead of starlette's ClientDisconnect traceback; nobody is left to read an answer.
        log.info("%s", exc)
        return Response(status_code=400)


def _add_features_route(app: FastAPI, svc: _Service) -> None:
    max_side = svc.limits.max_side

    @app.post("/features", summary="Dense features of one image", response_class=Response,
              openapi_extra={"requestBody": _REQUEST_BODY}, responses=_FEATURE_RESPONSES)
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
        started = time.monotonic()
        data = await image_bytes(request, svc.limits.max_bytes, svc.limits.read_timeout_s)
        frame, shown, net = await svc.frame(data, resize)
        feats = await svc.features(frame, net, started)
        out_hw = shown if pca_size is PcaSize.input else (feats.shape[1], feats.shape[2])
        return await _respond(feats, format, out_hw, net)


def create_app(extractor: Extractor, limits: Limits | None = None, **fields: Any) -> FastAPI:
    """A FastAPI app serving ``extractor`` (see the module docstring for the endpoints).

    Args:
        extractor: a :class:`~densekit.serve.extractor.FeatureExtractor` (or anything with ``.meta`` and
            ``__call__(frame, size=None) -> (D, h, w)``, optionally ``batch(frames, size)``).
        limits: every limit (:class:`Limits`; default: its defaults).
        fields: :class:`Limits` fields replacing those of ``limits``, e.g. ``max_bytes=1_000_000``.
    """
    try:
        limits = dataclasses.replace(limits or Limits(), **fields)
    except TypeError as exc:
        raise DensekitError(f"create_app: {one_line(exc)}") from None
    limits.check()
    svc = _Service(extractor, limits)
    meta = extractor.meta
    info = model_info(extractor)
    info["limits"] = {k: v for k, v in asdict(limits).items() if k not in ("max_batch", "max_delay_ms", "max_queue")}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await svc.batcher.aclose()

    app = FastAPI(
        title="densekit feature service",
        version=__version__,
        description=(
            f"Dense features of `{meta.name}` (D={meta.dim}, stride {meta.stride}). "
            "POST an image to /features; get a float32 (D, h, w) .npy or a PCA-as-RGB PNG."
        ),
        lifespan=lifespan,
    )
    app.add_middleware(PerClientLimit, per_client=limits.per_client)
    _add_error_handlers(app)

    @app.get("/health", summary="Liveness check")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model", summary="Model metadata contract, backend, provider, limits and batching")
    async def model() -> dict[str, Any]:
        return {**info, "batching": svc.info()}

    _add_features_route(app, svc)
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


def uvicorn_config(app: FastAPI, limits: Limits | None = None, *, log_level: str = "info") -> Any:
    """The uvicorn ``Config`` for ``app``: the header timeout, connection cap and h11 settings of ``limits``.

    ``timeout_keep_alive=5``: an idle keep-alive connection is closed after 5 s. ``limit_concurrency``:
    uvicorn answers 503 itself beyond this many open connections or tasks; far above ``per_client`` so one
    slow client cannot fill it. ``h11_max_incomplete_event_size``: a request head over 16 KiB is a 400.
    """
    import uvicorn

    limits = limits or Limits()
    return uvicorn.Config(
        app,
        log_level=log_level,
        http=timed_h11(limits.read_timeout_s),
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,
    )


def serve(
    extractor: Extractor,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    *,
    log_level: str = "info",
) -> None:
    """Run the service with uvicorn until interrupted (blocking).

    The listening socket is opened here, so a port in use or an address this machine does not have is
    a one-line :class:`DensekitError` rather than uvicorn's log line and ``sys.exit(1)``.
    """
    import socket

    import uvicorn

    limits = limits or Limits()
    app = create_app(extractor, limits)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        raise DensekitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    config = uvicorn_config(app, limits, log_level=log_level)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    # Config() has set up uvicorn's loggers; with our own socket uvicorn does not print the address.
    log.info("densekit feature service on http://%s:%d (docs at /docs)", shown, bound_port)
    with sock:
        uvicorn.Server(config).run(sockets=[sock])


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_SIDE",
    "Limits",
    "create_app",
    "decode_image",
    "is_loopback",
    "load_rgb",
    "model_info",
    "open_image",
    "pca_rgb",
    "serve",
    "uvicorn_config",
]
