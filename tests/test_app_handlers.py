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


def _two_clips(tmp_path):
    """The first two sample videos (10 frames each, 144x256) and their frames one after the other."""
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_image
    from densekit.serve.sample import make_sample

    root = DavisRoot(make_sample(tmp_path / "sample", sequences=2, frames=10, height=144, width=256))
    a, b = ([read_image(p) for p in root.frame_paths(s)] for s in root.sequences()[:2])
    return a, b


def test_scene_cuts_are_colour_jumps_between_shots(tmp_path) -> None:
    from densekit.apps.app.scene_cut import CUT_DISTANCE, SceneCutDetector, frame_distance

    a, b = _two_clips(tmp_path)
    within = max(frame_distance(x, y) for clip in (a, b) for x, y in zip(clip, clip[1:]))
    across = frame_distance(a[-1], b[0])
    assert within < CUT_DISTANCE < across, (within, across)
    detector = SceneCutDetector()
    cuts = [i for i, f in enumerate(a + b) if detector.is_cut(f)]
    assert cuts == [len(a)]  # the first frame fed is never a cut
    assert frame_distance(a[0], a[0]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DensekitError, match="scene-cut threshold"):
        SceneCutDetector(0.0)


class _CopyPropagator:
    """A stand-in propagator: every frame gets the first frame's mask (no model needed)."""

    def start(self, frame, mask) -> None:
        self.mask = mask

    def step(self, frame):
        return self.mask


def test_tracking_pauses_at_a_scene_cut_and_goes_on_from_it(tmp_path) -> None:
    import numpy as np

    from densekit.apps.app.track_session import TrackSession
    from densekit.apps.app.video import LoadedVideo

    a, b = _two_clips(tmp_path)
    session = TrackSession()
    session.dir = tmp_path
    session.video = LoadedVideo.from_frames(a + b, tmp_path)
    n = len(session.video)
    session.masks = np.zeros((n, 144, 256), np.uint8)
    session.has_mask = np.zeros(n, bool)
    first = np.zeros((144, 256), np.uint8)
    first[40:80, 60:120] = 1
    session.set_mask(0, first)
    done = [u.index for u in session.track(None, 0, propagator=_CopyPropagator())]
    assert done == list(range(1, len(a))) and session.cut_at == len(a) and not session.tracking
    assert not session.has_mask[len(a):].any()  # nothing carried onto the new shot
    session.set_mask(len(a), first)  # a new selection on the new shot, then Track from there
    done = [u.index for u in session.track(None, len(a), propagator=_CopyPropagator())]
    assert done == list(range(len(a) + 1, n)) and session.cut_at is None
    # with the pause off, tracking runs through the cut
    done = [u.index for u in session.track(None, 0, propagator=_CopyPropagator(), cuts=False)]
    assert done == list(range(1, n))


def test_the_default_sample_gives_way_to_the_users_load() -> None:
    """The page-load event loads the sample into the session in place; a load the user asked for first (or
    meanwhile: loads run one at a time) wins, so the page-load event never replaces the user's video."""
    from densekit.apps.app.track_session import TrackSession

    session = TrackSession()
    session.load_requests = 1  # what a user's load records before it takes the session's load lock
    assert session.load(None, "/nowhere", default=True) is None and session.video is None


def test_the_header_is_in_plain_words() -> None:
    from densekit.apps.app.display import header_markdown

    text = header_markdown("efficientnet_lite0", "torch:cpu", "live")
    assert "EfficientNet-Lite0" in text and "on the CPU" in text and "fast" in text
    assert not any(w in text for w in ("stride", "torch:cpu", "preset", "efficientnet_lite0"))
    assert "on the GPU" in header_markdown("m.onnx", "CUDAExecutionProvider", "dino")
