"""The Webcam tab: stream the camera, capture a frame, click its objects, track every streamed frame.

Each session's state is a :class:`~densekit.apps.app.webcam_session.WebcamSession`; frames that arrive while
the previous one is being processed are dropped (:func:`~densekit.apps.app.webcam_session.webcam_step`).
"""

# No ``from __future__ import annotations``: Gradio reads ``gr.SelectData`` parameters through
# typing.get_type_hints.

from typing import Any

import gradio as gr

from densekit.apps.app.atomic_image import AtomicImage
from densekit.apps.app.display import object_label
from densekit.apps.app.engine import Engine
from densekit.apps.app.handlers import object_choices, reports_errors, short_side_value
from densekit.apps.app.webcam_session import WebcamSession, webcam_step

# Gradio 6 swallows a denied camera permission and the page stays silent: the tab asks once itself when it
# opens and says what happened.
_WEBCAM_PROBE_JS = """
async () => {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "This browser gives the page no camera (a secure context, https or localhost, is needed).";
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({video: true});
    stream.getTracks().forEach((t) => t.stop());
    return "Camera ready: start the webcam, capture a frame, click the objects on it, then start tracking.";
  } catch (err) {
    if (err && (err.name === "NotAllowedError" || err.name === "SecurityError")) {
      return "Webcam access was denied: allow the camera for this site in the browser's settings and reload.";
    }
    return "No webcam available (" + (err && err.name ? err.name : "unknown error") + "): connect one and reload.";
  }
}
"""


class WebcamTab:
    """The Webcam tab's components (built in the constructor, inside the Blocks) and its handlers."""

    def __init__(self, engine: Engine, state: gr.State, concurrency: int) -> None:
        self.engine, self.state, self.concurrency = engine, state, concurrency
        with gr.Tab("Webcam", elem_id="tab-webcam") as self.tab:
            self.status = gr.Markdown(
                "Start the webcam (the browser asks for permission; if it is denied, allow the camera in the "
                "site settings and reload), capture a frame, click the objects on it, then start tracking.",
                elem_id="webcam-status",
            )
            with gr.Row():
                self.stream_in = gr.Image(
                    sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="webcam-input",
                    # Gradio asks for 1920x1440 by default; the model runs at <= 480p anyway.
                    webcam_options=gr.WebcamOptions(
                        constraints={"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}
                    ),
                )
                self.stream_out = AtomicImage(label="Tracked", interactive=False, format="jpeg", elem_id="webcam-output")
            self.latency = gr.Markdown("", elem_id="webcam-latency")
            self._capture_and_controls()
            self.click_x = gr.Number(visible=False, elem_id="webcam-x")
            self.click_y = gr.Number(visible=False, elem_id="webcam-y")
            self.click_btn = gr.Button(visible=False, elem_id="webcam-click-btn")

    def _capture_and_controls(self) -> None:
        with gr.Row():
            with gr.Column(scale=3):
                self.captured = gr.Image(
                    label="Captured frame: click objects", interactive=False, format="jpeg", elem_id="webcam-capture"
                )
            with gr.Column(scale=1):
                self.capture_btn = gr.Button("Capture frame", elem_id="webcam-capture-btn")
                self.mode = gr.Radio(
                    ["Positive", "Negative"], value="Positive", label="Click", elem_id="webcam-click-mode"
                )
                self.object_dd = gr.Dropdown(
                    choices=[(object_label(1), 1)], value=1, label="Object", elem_id="webcam-object"
                )
                self.new_object_btn = gr.Button("New object", elem_id="webcam-new-object-btn")
                self.resolution = gr.Dropdown(
                    choices=[(f"{r}p", r) for r in sorted(set(self.engine.resolutions()) | {240})],
                    value=240,
                    label="Processing size",
                    elem_id="webcam-resolution",
                )
                self.track_btn = gr.Button("Start tracking", variant="primary", elem_id="webcam-track-btn")
                self.stop_btn = gr.Button("Stop tracking", elem_id="webcam-stop-btn")

    # -- handlers -------------------------------------------------------------------------------------------

    @reports_errors
    def on_frame(self, session: WebcamSession, frame: Any) -> dict:
        r = webcam_step(session, frame)
        if r.dropped:
            return {}
        out = {self.stream_out: r.display, self.latency: f"{r.latency_ms:.0f} ms per frame"}
        if r.status:
            out[self.status] = r.status
        return out

    @reports_errors
    def on_capture(self, session: WebcamSession) -> dict:
        session.capture()
        return {self.captured: session.view(), self.status: "Captured: click the objects to track on it."}

    @reports_errors
    def on_click(self, session: WebcamSession, mode: Any, obj: Any, side: Any, x: Any, y: Any) -> dict:
        msg = session.click(self.engine, obj, x, y, mode != "Negative", short_side_value(side))
        return {self.captured: session.view(), self.status: msg}

    def on_select(self, session: WebcamSession, mode: Any, obj: Any, side: Any, evt: gr.SelectData) -> dict:
        return self.on_click(session, mode, obj, side, evt.index[0], evt.index[1])

    @reports_errors
    def on_new_object(self, session: WebcamSession) -> dict:
        o = session.new_object()
        return {self.object_dd: object_choices(session.objects, o), self.status: f"New {object_label(o)}."}

    @reports_errors
    def on_track(self, session: WebcamSession, side: Any) -> dict:
        return {self.status: session.start(self.engine, short_side_value(side))}

    def on_stop(self, session: WebcamSession) -> dict:
        return {self.status: session.stop()}

    # -- events ---------------------------------------------------------------------------------------------

    def wire(self) -> None:
        s = self.state
        self.tab.select(None, None, [self.status], js=_WEBCAM_PROBE_JS)
        self.stream_in.stream(
            self.on_frame,
            [s, self.stream_in],
            [self.stream_out, self.latency, self.status],
            api_name="webcam_frame",
            stream_every=0.1,
            time_limit=600,
            concurrency_limit=self.concurrency,
            show_progress="hidden",
        )
        self.capture_btn.click(self.on_capture, [s], [self.captured, self.status], api_name="webcam_capture")
        self.click_btn.click(
            self.on_click,
            [s, self.mode, self.object_dd, self.resolution, self.click_x, self.click_y],
            [self.captured, self.status],
            api_name="webcam_click",
        )
        self.captured.select(
            self.on_select,
            [s, self.mode, self.object_dd, self.resolution],
            [self.captured, self.status],
            api_name="webcam_select",
            api_visibility="undocumented",
        )
        self.new_object_btn.click(
            self.on_new_object, [s], [self.object_dd, self.status], api_name="webcam_new_object"
        )
        self.track_btn.click(self.on_track, [s, self.resolution], [self.status], api_name="webcam_track")
        self.stop_btn.click(self.on_stop, [s], [self.status], api_name="webcam_stop", concurrency_limit=None)
