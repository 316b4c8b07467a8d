"""Property-based API test: schemathesis drives the feature service's own OpenAPI schema, over real HTTP.

Schemathesis (4.x) generates requests from ``/openapi.json`` -- query parameters inside and outside their
ranges, bodies of every declared media type (its own small PNG/JPEG/GIF samples for image types, random
bytes and multipart forms otherwise) -- and sends them to a uvicorn server on a loopback port, with every
check schemathesis has (as ``--checks all``). Whatever it sends, the service must never answer 5xx, must
only use status codes, content types and headers its schema declares, its JSON answers must match their
schemas, and schema-valid requests must be accepted -- except that an image smaller than the model's input
multiple is 422 (documented; a JSON schema cannot state an image's pixel size, and schemathesis's own
sample PNG is 1x1), which :func:`accepted_unless_too_small` checks precisely instead.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from _http_server import running_server  # noqa: E402

from densekit.serve.extractor import FeatureExtractor  # noqa: E402
from densekit.serve.http import create_app, resized_size  # noqa: E402

MAX_SIDE = 256
MULTIPLE = 8  # the pixels backbone's input multiple


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    # pixels: a real dense "backbone" with no weights, so hundreds of requests stay cheap; small limits so
    # generated `resize` values and bodies stay small too.
    assert FeatureExtractor("pixels").meta.input_multiple == MULTIPLE
    app = create_app(FeatureExtractor("pixels"), max_bytes=1_000_000, max_side=MAX_SIDE)
    with running_server(app) as url:
        yield url


def _image_size(body: object) -> tuple[int, int] | None:
    """(width, height) of a raw body Pillow can decode, else None (multipart bodies: None too)."""
    if not isinstance(body, (bytes, bytearray)):
        return None
    try:
        with Image.open(io.BytesIO(bytes(body))) as im:
            im.load()
            return im.size
    except Exception:  # noqa: BLE001 - not an image
        return None


def accepted_unless_too_small(ctx, response, case) -> None:
    """positive_data_acceptance for a binary body: a raw body that is a decodable image the model can take
    must be accepted; 422 only for an image below the model's input multiple, 400/415 only for a body that
    is not a decodable image, 413 only for a longer side above max_side without resize."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or case.operation.path != "/features":
        return
    code = response.status_code
    if 200 <= code < 300 or code in (429, 503, 504) or not isinstance(case.body, (bytes, bytearray)):
        return  # multipart bodies: status_code_conformance checks the code is documented
    size = _image_size(case.body)
    if size is None:
        assert code in (400, 415), f"a body that is not an image got {code}: {response.text[:200]}"
        return
    w, h = size
    resize = (case.query or {}).get("resize")
    if resize is None and max(w, h) > MAX_SIDE:
        assert code == 413, f"a {w}x{h} image without resize got {code}"
        return
    rh, rw = resized_size((h, w), int(resize)) if resize is not None else (h, w)
    assert min(rh, rw) < MULTIPLE and code == 422, f"a decodable {w}x{h} image was rejected: {code} {response.text[:200]}"
    assert "smaller than the model's input multiple" in response.json()["detail"]


def test_api_never_answers_5xx_and_conforms(base_url: str) -> None:
    # Not `schemathesis.pytest.from_fixture` + `@schema.parametrize()`: its lazy loader sets the private
    # `Function._nodeid`, which pytest 9 no longer has (AttributeError at setup). Driving each
    # operation's Hypothesis strategy directly is the same generation without the pytest plugin.
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("GET", "/health"),
        ("GET", "/model"),
        ("POST", "/features"),
    }
    calls = 0
    for op in operations:
        # Negative (schema-violating) requests only where there is something to violate.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                nonlocal calls
                calls += 1
                # checks=None: every check schemathesis has registered, as `--checks all`.
                case.call_and_validate(base_url=base_url, timeout=30, excluded_checks=[positive_data_acceptance],
                                       additional_checks=[accepted_unless_too_small])

            run()
    assert calls >= 50
