"""The Track tab: load a video, select objects on any frame (clicks, brush, mask upload), track, download.

Element ids and api names are the contract with the browser test and API clients (see the package docs).
"""

# No ``from __future__ import annotations``: Gradio reads ``gr.SelectData`` parameters through
# typing.get_type_hints, and plain annotations keep that independent of how this module imports gradio.

from collections.abc import Iterator
from typing import Any, Optional

import gradio as gr

from densekit.apps.app.atomic_image import AtomicImage
from densekit.apps.app.display import object_label
from densekit.apps.app.engine import Engine
from densekit.apps.app.handlers import (
    editor_value,
    object_choices,
    reports_errors,
    short_side_value,
    threshold_value,
)
from densekit.apps.app.track_session import NO_VIDEO, TrackSession, TrackUpdate
from densekit.serve.errors import DensekitError


class TrackTab:
    """The Track tab's components (built in the constructor, inside the Blocks) and its handlers."""

    def __init__(self, engine: Engine, state: gr.State, samples: list[str]) -> None:
        self.engine, self.state, self.samples = engine, state, samples
        with gr.Tab("Track", elem_id="tab-track"):
            self._sources()
            self.status = gr.Markdown("Load a video: a sample, an upload or a frames folder.", elem_id="status-md")
            self.frame_slider = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="frame-slider")
            self._frame_and_clicks()
            self._brush()
            self._tracking_and_downloads()
            # API-only inputs: clients send click coordinates here (the page uses frame-image's .select)
            self.click_x = gr.Number(visible=False, elem_id="click-x")
            self.click_y = gr.Number(visible=False, elem_id="click-y")
            self.click_btn = gr.Button(visible=False, elem_id="click-btn")

    # -- layout ---------------------------------------------------------------------------------------------

    def _sources(self) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                self.sample_dd = gr.Dropdown(
                    choices=self.samples,
                    value=self.samples[0] if self.samples else None,
                    label="Sample sequence",
                    elem_id="sample-dropdown",
                )
                with gr.Row():
                    self.load_sample_btn = gr.Button("Load sample", elem_id="load-sample-btn")
                    self.sample_gt_btn = gr.Button("Use sample annotation", elem_id="sample-gt-btn", size="sm")
            with gr.Column(scale=1):
                self.video_upload = gr.File(
                    label="Upload a video (mp4, avi, webm, mov, mkv)", type="filepath", elem_id="video-upload"
                )
            with gr.Column(scale=1):
                self.frames_dir = gr.Textbox(label="Frames folder or video file on the server", elem_id="frames-dir")
                self.load_dir_btn = gr.Button("Load folder", elem_id="load-dir-btn")

    def _frame_and_clicks(self) -> None:
        resolutions = self.engine.resolutions()
        with gr.Row():
            with gr.Column(scale=3):
                self.frame_image = AtomicImage(
                    label="Frame: click an object to select it",
                    interactive=False,
                    format="jpeg",
                    elem_id="frame-image",
                    buttons=["fullscreen"],
                )
            with gr.Column(scale=1):
                self.click_mode = gr.Radio(
                    ["Positive", "Negative"], value="Positive", label="Click", elem_id="click-mode"
                )
                self.object_dd = gr.Dropdown(
                    choices=[(object_label(1), 1)], value=1, label="Object", elem_id="object-dropdown"
                )
                self.new_object_btn = gr.Button("New object", elem_id="new-object-btn")
                self.clear_object_btn = gr.Button("Clear object on this frame", elem_id="clear-object-btn", size="sm")
                self.threshold = gr.Slider(
                    0.0, 1.0, value=0.0, step=0.01, label="Similarity threshold (0 = automatic)",
                    elem_id="click-threshold",
                )
                self.resolution = gr.Dropdown(
                    choices=[(f"auto (video size, at most {resolutions[0]}p)", 0)]
                    + [(f"{r}p", r) for r in resolutions],
                    value=0,
                    label="Processing size (shorter side)",
                    elem_id="resolution-dropdown",
                )

    def _brush(self) -> None:
        with gr.Row():
            with gr.Column(scale=3):
                self.brush_editor = gr.ImageEditor(
                    label="Brush: paint the current object",
                    type="numpy",
                    image_mode="RGBA",
                    transforms=(),
                    layers=False,
                    brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"),
                    format="png",
                    elem_id="brush-editor",
                )
            with gr.Column(scale=1):
                self.brush_action = gr.Radio(
                    ["Add", "Erase", "Replace"], value="Add", label="Brush applies as", elem_id="brush-action"
                )
                self.use_brush_btn = gr.Button("Apply drawing", elem_id="use-brush-btn")
                self.mask_upload = gr.File(
                    label="Upload a mask PNG for this frame", type="filepath", elem_id="mask-upload"
                )

    def _tracking_and_downloads(self) -> None:
        with gr.Row():
            self.track_btn = gr.Button("Track from this frame", variant="primary", elem_id="track-btn")
            self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        self.fps_text = gr.Markdown("", elem_id="fps-text")
        self.overlay_image = AtomicImage(
            label="Tracking (live)", interactive=False, format="jpeg", elem_id="overlay-image"
        )
        with gr.Row():
            with gr.Column():
                self.download_masks_btn = gr.Button("Download masks (zip of PNGs)", elem_id="download-masks-btn")
                self.masks_file = gr.File(label="Masks", interactive=False, elem_id="masks-file")
            with gr.Column():
                self.download_video_btn = gr.Button("Download overlay video (mp4)", elem_id="download-video-btn")
                self.video_file = gr.File(label="Overlay video", interactive=False, elem_id="video-file")

    # -- what a handler shows -------------------------------------------------------------------------------

    def _loaded(self, session: TrackSession, message: str) -> dict:
        """Everything a newly loaded video resets: sliders, the first frame, objects, results."""
        n = len(session.video)  # type: ignore[arg-type]
        first = session.render(0)
        return {
            self.status: message,
            self.frame_slider: gr.update(minimum=0, maximum=max(n - 1, 1), value=0),
            self.pca_slider: gr.update(minimum=0, maximum=max(n - 1, 1), value=0),
            self.frame_image: first,
            self.brush_editor: editor_value(first),
            self.object_dd: object_choices(session.objects, session.current),
            self.overlay_image: None,
            self.fps_text: "",
            self.masks_file: None,
            self.video_file: None,
        }

    def _edited(self, session: TrackSession, i: int, message: str) -> dict:
        return {
            self.frame_image: session.render(i),
            self.status: message,
            self.object_dd: object_choices(session.objects, session.current),
        }

    # -- loading --------------------------------------------------------------------------------------------

    @reports_errors
    def on_load_sample(self, session: TrackSession, name: Any) -> dict:
        root = self.engine.sample_root()
        if root is None or not name or str(name) not in self.samples:
            raise DensekitError("Choose one of the bundled samples.")
        frames = root / "JPEGImages" / "480p" / str(name)
        annotations = root / "Annotations" / "480p" / str(name)
        return self._loaded(session, session.load(self.engine, frames, annotations=annotations, limit_size=False))

    @reports_errors
    def on_load_video(self, session: TrackSession, path: Any) -> dict:
        if path is None:
            raise DensekitError("Choose a video file to upload.")
        return self._loaded(session, session.load(self.engine, path))

    @reports_errors
    def on_load_frames(self, session: TrackSession, folder: Any) -> dict:
        return self._loaded(session, session.load(self.engine, folder, limit_size=False))

    @reports_errors
    def on_show_frame(self, session: TrackSession, i: Any) -> dict:
        i = session.check_frame(i)
        img = session.render(i)
        ids = session.objects_in(i)
        what = f"objects {', '.join(map(str, ids))}" if ids else "no object"
        return {self.frame_image: img, self.brush_editor: editor_value(img), self.status: f"Frame {i}: {what}."}

    # -- selecting ------------------------------------------------------------------------------------------

    @reports_errors
    def on_click(self, session: TrackSession, i: Any, obj: Any, mode: Any, thr: Any, side: Any, x: Any, y: Any) -> dict:
        positive = mode != "Negative"
        msg = session.click(self.engine, i, obj, x, y, positive, threshold_value(thr), short_side_value(side))
        return self._edited(session, int(i), msg)

    @reports_errors
    def on_click_select(
        self, session: TrackSession, i: Any, obj: Any, mode: Any, thr: Any, side: Any, evt: gr.SelectData
    ) -> dict:
        if session.video is None:
            raise DensekitError(NO_VIDEO)
        s = session.display_scale()  # the page shows the frame downscaled: map the click back
        return self.on_click(session, i, obj, mode, thr, side, evt.index[0] / s, evt.index[1] / s)

    @reports_errors
    def on_new_object(self, session: TrackSession) -> dict:
        o = session.new_object()
        return {
            self.object_dd: object_choices(session.objects, o),
            self.status: f"New {object_label(o)}: click it on the frame.",
        }

    @reports_errors
    def on_clear_object(self, session: TrackSession, i: Any, obj: Any) -> dict:
        return self._edited(session, int(i), session.clear_object(i, obj))

    @reports_errors
    def on_brush(self, session: TrackSession, i: Any, obj: Any, editor: Any, action: Any) -> dict:
        out = self._edited(session, int(i), session.brush(i, obj, editor, action or "Add"))
        out[self.brush_editor] = editor_value(out[self.frame_image])
        return out

    @reports_errors
    def on_mask_upload(self, session: TrackSession, i: Any, obj: Any, path: Any) -> dict:
        return self._edited(session, int(i), session.upload_mask(i, obj, path))

    @reports_errors
    def on_sample_annotation(self, session: TrackSession, i: Any) -> dict:
        return self._edited(session, int(i), session.use_annotation(i))

    # -- tracking and downloads -----------------------------------------------------------------------------

    @reports_errors
    def on_track(self, session: TrackSession, start: Any, side: Any) -> Iterator[dict]:
        last: Optional[TrackUpdate] = None
        updates = session.track(self.engine, start, short_side_value(side))
        try:
            yield {self.status: f"Tracking from frame {start}...", self.fps_text: ""}
            for u in updates:
                last = u
                yield {
                    self.overlay_image: u.display,
                    self.fps_text: f"{u.fps:.1f} fps · frame {u.index + 1}/{u.total} · "
                    f"{u.step_seconds * 1e3:.0f} ms model + propagation",
                }
        finally:
            updates.close()  # a cancelled event must still end the session's tracking state
        if last is None:
            yield {self.status: "Stopped before the first frame."}
            return
        end = "Stopped" if last.index < last.total - 1 else "Done"
        img = session.render(last.index)
        yield {
            self.status: f"{end} at frame {last.index} ({last.frames_done} frames at {last.fps:.1f} fps). "
            "Correct any frame and track again from it, or download the results.",
            self.frame_slider: gr.update(value=last.index),
            self.frame_image: img,
            # the brush paints on the frame the slider now shows, not the one tracking started from
            self.brush_editor: editor_value(img),
        }

    def on_stop(self, session: TrackSession) -> dict:
        return {self.status: session.stop()}

    @reports_errors
    def on_download_masks(self, session: TrackSession) -> dict:
        path = session.export_masks()
        n = len(session.require_video())
        return {self.masks_file: str(path), self.status: f"Masks of {n} frames: {path.name}."}

    @reports_errors
    def on_download_video(self, session: TrackSession) -> dict:
        path = session.export_video()
        return {self.video_file: str(path), self.status: f"Overlay video: {path.name}."}

    # -- events ---------------------------------------------------------------------------------------------

    def wire(self, pca_slider: gr.Slider) -> None:
        """Register the tab's events. ``pca_slider``: the Features tab's frame slider, reset on each load."""
        self.pca_slider = pca_slider
        s = self.state
        view = [
            self.status, self.frame_slider, self.frame_image, self.object_dd, self.brush_editor, pca_slider,
            self.overlay_image, self.fps_text, self.masks_file, self.video_file,
        ]
        edit = [self.frame_image, self.status, self.object_dd]
        self.load_sample_btn.click(self.on_load_sample, [s, self.sample_dd], view, api_name="load_sample")
        self.video_upload.upload(self.on_load_video, [s, self.video_upload], view, api_name="load_video")
        self.load_dir_btn.click(self.on_load_frames, [s, self.frames_dir], view, api_name="load_frames")
        self.sample_gt_btn.click(
            self.on_sample_annotation, [s, self.frame_slider], edit, api_name="sample_annotation"
        )
        self.frame_slider.release(
            self.on_show_frame, [s, self.frame_slider], [self.frame_image, self.brush_editor, self.status],
            api_name="show_frame",
        )
        clicks = [s, self.frame_slider, self.object_dd, self.click_mode, self.threshold, self.resolution]
        self.click_btn.click(self.on_click, [*clicks, self.click_x, self.click_y], edit, api_name="click")
        self.frame_image.select(
            self.on_click_select, clicks, edit, api_name="click_select", api_visibility="undocumented"
        )
        self.new_object_btn.click(self.on_new_object, [s], [self.object_dd, self.status], api_name="new_object")
        self.clear_object_btn.click(
            self.on_clear_object, [s, self.frame_slider, self.object_dd], edit, api_name="clear_object"
        )
        self.use_brush_btn.click(
            self.on_brush,
            [s, self.frame_slider, self.object_dd, self.brush_editor, self.brush_action],
            [*edit, self.brush_editor],
            api_name="use_brush",
        )
        self.mask_upload.upload(
            self.on_mask_upload, [s, self.frame_slider, self.object_dd, self.mask_upload], edit, api_name="upload_mask"
        )
        self._wire_tracking()

    def _wire_tracking(self) -> None:
        s = self.state
        self.track_btn.click(
            self.on_track,
            [s, self.frame_slider, self.resolution],
            [self.overlay_image, self.fps_text, self.status, self.frame_slider, self.frame_image, self.brush_editor],
            api_name="track",
            show_progress="hidden",
        )
        self.stop_btn.click(
            self.on_stop, [s], [self.status], api_name="stop", concurrency_limit=None, show_progress="hidden"
        )
        self.download_masks_btn.click(
            self.on_download_masks, [s], [self.masks_file, self.status], api_name="download_masks"
        )
        self.download_video_btn.click(
            self.on_download_video, [s], [self.video_file, self.status], api_name="download_video"
        )
