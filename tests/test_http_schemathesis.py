"""Property-based API test: schemathesis drives the feature service's own OpenAPI schema, over real HTTP.

Schemathesis (4.x) generates requests from ``/openapi.json`` -- query parameters inside and outside their
ranges, bodies of every declared media type (its own small PNG/JPEG/GIF samples for image types, random
bytes and multipart forms otherwise) -- and sends them to a uvicorn server on a loopback port. Whatever
it sends, the service must never answer 5xx, must only use status codes and content types its schema
declares, and its JSON answers must match their schemas.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from _http_server import running_server  # noqa: E402

from densekit.serve.extractor import FeatureExtractor  # noqa: E402
from densekit.serve.http import create_app  # noqa: E402


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    # pixels: a real dense "backbone" with no weights, so hundreds of requests stay cheap; small limits so
    # generated `resize` values and bodies stay small too.
    app = create_app(FeatureExtractor("pixels"), max_bytes=1_000_000, max_side=256)
    with running_server(app) as url:
        yield url


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


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
                case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

            run()
    assert calls >= 50
