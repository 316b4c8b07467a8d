"""The app's error-reporting decorator and value conversions (densekit.apps.app.handlers), without a server."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator

import pytest

gr = pytest.importorskip("gradio")

from densekit.apps.app.handlers import (  # noqa: E402
    reports_errors,
    short_side_value,
    threshold_value,
)
from densekit.serve.errors import DensekitError  # noqa: E402


class _Tab:
    status = "the status line"

    @reports_errors
    def refuse(self, what: str) -> dict:
        raise DensekitError(f"no {what}\nhere")

    @reports_errors
    def bug(self) -> dict:
        return {"x": 1 / 0}

    @reports_errors
    def fine(self, a: int, b: int = 2) -> dict:
        return {"sum": a + b}

    @reports_errors
    def stream(self, n: int) -> Iterator[dict]:
        yield {"step": 0}
        if n:
            raise DensekitError("stopped")
        yield {"step": 1}

    @reports_errors
    def select(self, i: int, evt: gr.SelectData) -> dict:
        return {"i": i}


def test_errors_become_the_tabs_status_line(caplog: pytest.LogCaptureFixture) -> None:
    tab = _Tab()
    assert tab.fine(1) == {"sum": 3}
    with pytest.warns(UserWarning, match="^no video here$"):  # gr.Warning's toast, outside a request
        assert tab.refuse("video") == {tab.status: "⚠️ no video here"}
    with caplog.at_level(logging.ERROR, logger="densekit.apps.app"), pytest.warns(UserWarning, match="Internal"):
        out = tab.bug()
    assert out == {tab.status: "⚠️ Internal error (ZeroDivisionError): division by zero"}
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)  # traceback kept in the log


def test_streaming_handlers_stay_generators_and_end_on_error() -> None:
    tab = _Tab()
    assert inspect.isgeneratorfunction(tab.stream)  # Gradio streams only generator functions
    assert list(tab.stream(0)) == [{"step": 0}, {"step": 1}]
    with pytest.warns(UserWarning, match="stopped"):
        assert list(tab.stream(1)) == [{"step": 0}, {tab.status: "⚠️ stopped"}]
    g = tab.stream(0)
    next(g)
    g.close()  # a cancelled event: GeneratorExit is not turned into a status line


def test_gradio_still_sees_the_handlers_parameters() -> None:
    from gradio.utils import get_type_hints

    tab = _Tab()
    assert list(inspect.signature(tab.fine).parameters) == ["a", "b"]
    assert get_type_hints(tab.select)["evt"] is gr.SelectData  # how Gradio finds what to inject


def test_page_values() -> None:
    assert short_side_value(0) is None and short_side_value("") is None and short_side_value("360") == 360
    assert threshold_value(0) is None and threshold_value(None) is None and threshold_value("0.4") == 0.4
    with pytest.raises(DensekitError, match="processing size"):
        short_side_value("big")
    with pytest.raises(DensekitError, match="threshold"):
        threshold_value("high")
