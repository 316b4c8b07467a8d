"""The app as one ``gr.Blocks``: the engine, the per-session states and the four tabs, wired together."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from densekit.apps.app.display import header_markdown
from densekit.apps.app.engine import DEFAULT_MODEL, DEFAULT_SAMPLES_DIR, Engine, shared_extractor
from densekit.apps.app.track_session import TrackSession
from densekit.apps.app.webcam_session import WebcamSession


def _close(session: Any) -> None:
    """Gradio's delete callback of a Track session's state: the session's files go with it."""
    if isinstance(session, TrackSession):
        session.close()


def build_app(
    model: Any = DEFAULT_MODEL,
    index: Optional[Any] = None,
    *,
    max_video_mb: float = 200,
    max_frames: int = 600,
    preset: Optional[str] = None,
    samples_dir: Optional[Path] = DEFAULT_SAMPLES_DIR,
    short_side: Optional[int] = None,
    max_side: int = 1280,
    device: Optional[str] = None,
    concurrency: int = 4,
) -> Any:
    """The app as a ``gr.Blocks`` (not launched). See :mod:`densekit.apps.app` for tabs and endpoints.

    model: backbone name, checkpoint, .onnx or .engine (loaded once per process), or an extractor object.
    index: a segment index folder for the Search tab. samples_dir: where the bundled sample sequences are
    made on first use (None: no samples). preset: propagation preset (default "live");
    short_side: default processing short side. max_video_mb / max_frames / max_side: limits on
    loaded videos. concurrency: events of one kind running at once across sessions (the model itself runs
    one call at a time).
    """
    import gradio as gr

    # the tabs import gradio at their top: importing them here keeps `import densekit.apps.app` light
    from densekit.apps.app.tab_features import FeaturesTab
    from densekit.apps.app.tab_search import SearchTab
    from densekit.apps.app.tab_track import TrackTab
    from densekit.apps.app.tab_webcam import WebcamTab

    extractor = shared_extractor(model, device)
    label = model if isinstance(model, (str, Path)) else getattr(extractor.meta, "name", "model")
    engine = Engine(
        extractor, model_label=str(label), preset=preset, short_side=short_side, max_video_mb=max_video_mb,
        max_frames=max_frames, max_side=max_side, index=Path(index) if index else None, samples_dir=samples_dir,
    )
    if engine.index is not None:
        engine.open_index(engine.index).close()  # a bad --index fails now, in one line
    intro = header_markdown(engine.model_label, extractor.provider, engine.preset)
    with gr.Blocks(title="densekit", delete_cache=(1800, 3600)) as demo:
        # instances, not the classes: each session gets a fresh deep copy when it first needs one, and no
        # page-load event writes a session (the default sample's load fills it in place and gives way to the
        # user's own load: TrackSession.load)
        track_state = gr.State(TrackSession(), delete_callback=_close)
        webcam_state = gr.State(WebcamSession())
        gr.Markdown(intro)
        with gr.Tabs():
            track = TrackTab(engine, track_state, engine.sample_names())
            webcam = WebcamTab(engine, webcam_state, concurrency)
            search = SearchTab(engine)
            features = FeaturesTab(engine, track_state, track.resolution)
        track.wire(features.slider)
        track.wire_open(demo)
        webcam.wire()
        search.wire()
        features.wire()
    demo.queue(default_concurrency_limit=concurrency)
    demo.engine = engine  # for tests and benchmarks: the shared model and settings
    return demo


def launch_kwargs(max_video_mb: float) -> dict[str, Any]:
    """``demo.launch`` settings the CLI uses: uploads are bounded a little above the video limit, so a video
    just over it gets the app's own message while a huge upload is refused by the server."""
    return {"max_file_size": f"{int(max_video_mb * 1.5) + 1}mb", "footer_links": ["api", "gradio"]}
