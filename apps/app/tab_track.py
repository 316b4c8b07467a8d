"""The Track tab: one viewer to click on and to watch, the controls beside it.

The frame you click on is the frame tracking plays in (as SAM 2's and Cutie's demos do): ``#frame-image``
shows the slider's frame with its masks, takes the clicks, and shows each tracked frame live while the slider
follows. Everything a session needs sits beside it in one column (video, objects, click mode, brush, Track /
Stop, downloads), so nothing needed is below the fold of a 1280x800 window; the status line is above the
viewer. The brush editor takes the viewer's place only while "Paint with a brush" is ticked. Frames are
numbered from 0 everywhere (slider, messages, fps line, API), like the frame files.

Element ids and api names are the contract with the browser test and API clients (see the package docs).
"""

# No ``from __future__ import annotations``: Gradio reads ``gr.SelectData`` parameters through
# typing.get_type_hints, and plain annotations keep that independent of how this module imports gradio.

from collections.abc import Iterator
from typing import Any, Optional

import gradio as gr

from densekit.apps.app.atomic_image import AtomicImage
from densekit.apps.app.display import hint_picture, object_label
from densekit.apps.app.engine import Engine
from densekit.apps.app.selection import area_note
from densekit.apps.app.handlers import (
    editor_value,
    object_choices,
    reports_errors,
    short_side_value,
    threshold_value,
    warning,
)
from densekit.apps.app.track_session import NO_VIDEO, TrackSession, TrackUpdate
from densekit.serve.errors import DensekitError

VIEWER_HEIGHT = 430  # px: the viewer, its status line and slider fit a 1280x800 window under the header
HINT = "**1** Load a video (a sample is loaded for you) · **2** Click the object to follow · **3** Press **Track**"
ANNOTATION_INFO = "Samples come with exact masks of their objects: this puts this frame's in place of your clicks."


class TrackTab:
    """The Track tab's components (built in the constructor, inside the Blocks) and its handlers."""

    def __init__(self, engine: Engine, state: gr.State, samples: list[str]) -> None:
        self.engine, self.state, self.samples = engine, state, samples
        with gr.Tab("Track", elem_id="tab-track"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=520):
                    self._viewer()
                with gr.Column(scale=2, min_width=340, elem_id="track-controls"):
                    self._sources()
                    self._selection()
                    self._tracking_and_downloads()
                    self._settings()
            # API-only inputs: clients send click coordinates here (the page uses frame-image's .select)
            self.click_x = gr.Number(visible=False, elem_id="click-x")
            self.click_y = gr.Number(visible=False, elem_id="click-y")
            self.click_btn = gr.Button(visible=False, elem_id="click-btn")

    # -- layout ---------------------------------------------------------------------------------------------

    def _viewer(self) -> None:
        self.status = gr.Markdown(HINT, elem_id="status-md")
        self.frame_image = AtomicImage(
            value=hint_picture(),
            label="Click an object to select it; tracking plays here",
            interactive=False,
            format="jpeg",
            height=VIEWER_HEIGHT,
            elem_id="frame-image",
            buttons=["fullscreen"],
        )
        self.brush_editor = gr.ImageEditor(
            label="Paint the current object, then press Apply drawing",
            type="numpy",
            image_mode="RGBA",
            transforms=(),
            layers=False,
            brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"),
            format="png",
            height=VIEWER_HEIGHT,
            visible="hidden",  # mounted while hidden: a value sent with it shown is not lost
            elem_id="brush-editor",
        )
        with gr.Row(equal_height=True):
            self.play_btn = gr.Button("▶ Play", size="sm", scale=0, min_width=80, elem_id="play-btn")
            self.frame_slider = gr.Slider(
                0, 1, value=0, step=1, label="Frame (numbered from 0)", elem_id="frame-slider", scale=8
            )
        self.fps_text = gr.Markdown("", elem_id="fps-text")

    def _sources(self) -> None:
        with gr.Row(equal_height=True):
            self.sample_dd = gr.Dropdown(
                choices=self.samples,
                value=self.samples[0] if self.samples else None,
                label="Sample video",
                show_label=False,
                container=False,
                elem_id="sample-dropdown",
                scale=3,
            )
            self.load_sample_btn = gr.Button(
                "Load sample", elem_id="load-sample-btn", size="md", scale=1, min_width=100
            )
        self.video_upload = gr.UploadButton(
            "Upload a video (mp4, avi, webm, mov, mkv)", type="filepath", size="md",
            elem_id="video-upload",
        )
        with gr.Accordion("A frames folder or video file on the server", open=False, elem_id="server-path"):
            with gr.Row(equal_height=True):
                self.frames_dir = gr.Textbox(
                    show_label=False, container=False, placeholder="/path/to/frames or /path/to/video.mp4",
                    elem_id="frames-dir", scale=3,
                )
                self.load_dir_btn = gr.Button("Load", elem_id="load-dir-btn", scale=1, min_width=70)

    def _selection(self) -> None:
        with gr.Row(equal_height=True):
            self.object_dd = gr.Dropdown(
                choices=[(object_label(1), 1)], value=1, label="Object", show_label=False, container=False,
                elem_id="object-dropdown", scale=3,
            )
            self.new_object_btn = gr.Button("New object", elem_id="new-object-btn", size="md", scale=1, min_width=100)
        self.click_mode = gr.Radio(
            [("Positive click: adds to the object", "Positive"), ("Negative: removes", "Negative")],
            value="Positive", show_label=False, container=False, elem_id="click-mode",
        )
        with gr.Row(equal_height=True):
            self.clear_object_btn = gr.Button("Clear object here", elem_id="clear-object-btn", size="sm")
            self.mask_upload = gr.UploadButton(
                "Upload a mask PNG", type="filepath", size="sm", elem_id="mask-upload"
            )
            self.brush_toggle = gr.Checkbox(
                value=False, label="Brush", container=False, elem_id="brush-toggle", min_width=80
            )
        with gr.Row(visible=False, equal_height=True) as self.brush_tools:
            self.brush_action = gr.Radio(
                ["Add", "Erase", "Replace"], value="Add", show_label=False, container=False, elem_id="brush-action",
                scale=2,
            )
            self.use_brush_btn = gr.Button("Apply drawing", elem_id="use-brush-btn", size="sm", scale=1)
        with gr.Row(visible=bool(self.samples), equal_height=True) as self.annotation_row:
            self.sample_gt_btn = gr.Button(
                "Use the sample's own mask", elem_id="sample-gt-btn", size="sm", scale=1, min_width=120
            )
            gr.Markdown(f"<small>{ANNOTATION_INFO}</small>", elem_id="sample-gt-info", container=False)

    def _tracking_and_downloads(self) -> None:
        with gr.Row(equal_height=True):
            self.track_btn = gr.Button("Track from this frame", variant="primary", elem_id="track-btn", scale=2)
            self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1, min_width=70)
        with gr.Row(equal_height=True):
            self.download_masks_btn = gr.Button("Download masks (zip)", elem_id="download-masks-btn", size="sm")
            self.download_video_btn = gr.Button("Download video (mp4)", elem_id="download-video-btn", size="sm")
        with gr.Row(equal_height=True):
            self.masks_file = gr.File(
                label="Masks", interactive=False, visible=False, height=50, elem_id="masks-file"
            )
            self.video_file = gr.File(
                label="Overlay video", interactive=False, visible=False, height=50, elem_id="video-file"
            )

    def _settings(self) -> None:
        resolutions = self.engine.resolutions()
        with gr.Accordion("Settings", open=False, elem_id="track-settings"):
            self.pause_at_cuts = gr.Checkbox(
                value=True, label="Pause at scene cuts (select again on the new shot)", elem_id="pause-at-cuts"
            )
            self.threshold = gr.Slider(
                0.0, 1.0, value=0.0, step=0.01, label="Similarity threshold of a click (0 = automatic)",
                elem_id="click-threshold",
            )
            self.resolution = gr.Dropdown(
                choices=[(f"auto (video size, at most {resolutions[0]}p)", 0)] + [(f"{r}p", r) for r in resolutions],
                value=0,
                label="Processing size (shorter side)",
                elem_id="resolution-dropdown",
            )

    # -- events ---------------------------------------------------------------------------------------------

    def wire(self, pca_slider: gr.Slider) -> None:
        """Register the tab's events. ``pca_slider``: the Features tab's frame slider, reset on each load."""
        _wire(self, pca_slider)

    def wire_open(self, demo: gr.Blocks) -> None:
        """Load the chosen sample when a page opens. The event writes no session state: it loads into the
        session in place and gives way to any load the user asks for (:meth:`TrackSession.load`)."""
        demo.load(self.on_open, [self.state, self.sample_dd], self.view_outputs(), show_progress="hidden")

    def view_outputs(self) -> list:
        """What a load changes (:meth:`_loaded`)."""
        return [
            self.status, self.frame_slider, self.frame_image, self.object_dd, self.click_mode, self.brush_toggle,
            self.brush_editor, self.brush_tools, self.pca_slider, self.fps_text, self.masks_file, self.video_file,
            self.annotation_row,
        ]

    # -- what a newly shown frame or video changes ----------------------------------------------------------

    def _brush_off(self) -> dict:
        """The brush put away: the viewer back in its place."""
        return {
            self.brush_toggle: False,
            self.brush_editor: gr.update(visible="hidden"),
            self.brush_tools: gr.update(visible=False),
            self.frame_image: gr.update(visible=True),
        }

    def _loaded(self, session: TrackSession, message: str) -> dict:
        """Everything a newly loaded video resets: sliders, the first frame, objects, click mode, brush,
        downloads, the annotation button (samples only)."""
        n = len(session.video)  # type: ignore[arg-type]
        return {
            **self._brush_off(),
            self.status: message,
            self.frame_slider: gr.update(minimum=0, maximum=max(n - 1, 1), value=0),
            self.pca_slider: gr.update(minimum=0, maximum=max(n - 1, 1), value=0),
            self.frame_image: gr.update(value=session.view(0), visible=True),
            self.object_dd: object_choices(session.objects, session.current),
            self.click_mode: "Positive",
            self.fps_text: "",
            self.masks_file: gr.update(value=None, visible=False),
            self.video_file: gr.update(value=None, visible=False),
            self.annotation_row: gr.update(visible=session.annotations is not None),
        }

    def _edited(self, session: TrackSession, i: int, message: str) -> dict:
        return {
            self.frame_image: session.view(i),
            self.status: message,
            self.object_dd: object_choices(session.objects, session.current),
        }

    # -- loading --------------------------------------------------------------------------------------------

    def _sample_paths(self, name: Any) -> tuple[Any, Any]:
        root = self.engine.sample_root()
        if root is None or not name or str(name) not in self.samples:
            raise DensekitError("Choose one of the bundled samples.")
        return root / "JPEGImages" / "480p" / str(name), root / "Annotations" / "480p" / str(name)

    @reports_errors
    def on_open(self, session: TrackSession, name: Any) -> dict:
        """The page opened: load the chosen sample, unless the user has already asked for a video."""
        if not self.samples or not name:
            return {self.status: gr.skip()}
        frames, annotations = self._sample_paths(name)
        message = session.load(self.engine, frames, annotations=annotations, limit_size=False, default=True)
        if message is None:
            return {self.status: gr.skip()}
        return self._loaded(session, message)

    @reports_errors
    def on_load_sample(self, session: TrackSession, name: Any) -> dict:
        frames, annotations = self._sample_paths(name)
        return self._loaded(session, session.load(self.engine, frames, annotations=annotations, limit_size=False))

    def on_load_video(self, session: TrackSession, path: Any) -> dict:
        try:
            if path is None:
                raise DensekitError("Choose a video file to upload.")
            return self._loaded(session, session.load(self.engine, path))
        except Exception as exc:  # reports_errors' status line, and the failed upload let go of
            return {self.status: warning(exc), self.video_upload: None}

    @reports_errors
    def on_load_frames(self, session: TrackSession, folder: Any) -> dict:
        return self._loaded(session, session.load(self.engine, folder, limit_size=False, server_path=True))

    @reports_errors
    def on_show_frame(self, session: TrackSession, i: Any, brush: Any = False) -> dict:
        i = session.check_frame(i)
        if session.tracking or session.playing:
            return {self.status: gr.skip()}  # the running loop owns the viewer and moves the slider itself
        ids = session.objects_in(i)
        img = session.view(i)
        out: dict = {
            self.frame_image: img,
            self.status: f"Frame {i}: {'objects ' + ', '.join(map(str, ids)) if ids else 'no object'}.",
        }
        if brush:
            out[self.brush_editor] = editor_value(img)
        return out

    @reports_errors
    def on_release_frame(self, session: TrackSession, i: Any, brush: Any = False) -> dict:
        """The slider let go of (pointer up, or the number box losing focus, as a click on the viewer does):
        its .input events showed that frame already, so nothing changes, and nothing overwrites the status of
        a click that landed meanwhile."""
        if session.video is not None and session.is_shown(session.check_frame(i)):
            return {self.status: gr.skip()}
        return self.on_show_frame(session, i, brush)

    # -- selecting ------------------------------------------------------------------------------------------

    @reports_errors
    def on_click(self, session: TrackSession, i: Any, obj: Any, mode: Any, thr: Any, side: Any, x: Any, y: Any) -> dict:
        positive = mode != "Negative"
        msg = session.click(self.engine, i, obj, x, y, positive, threshold_value(thr), short_side_value(side))
        msg += area_note(float((session.mask(int(i)) == session.check_object(obj)).mean()))  # area, and a hint if wide
        return self._edited(session, int(i), msg)

    @reports_errors
    def on_click_select(
        self, session: TrackSession, i: Any, obj: Any, mode: Any, thr: Any, side: Any, evt: gr.SelectData
    ) -> dict:
        if session.video is None:
            raise DensekitError(f"{NO_VIDEO} Pick a sample and press Load sample, or upload one.")
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
    def on_brush_toggle(self, session: TrackSession, i: Any, on: Any) -> dict:
        if session.video is None:
            return {self.brush_toggle: False, self.status: warning(DensekitError(NO_VIDEO))}
        img = session.view(session.check_frame(i))
        if not on:
            return {**self._brush_off(), self.frame_image: gr.update(value=img, visible=True)}
        return {
            self.brush_editor: gr.update(value=editor_value(img), visible=True),
            self.brush_tools: gr.update(visible=True),
            self.frame_image: gr.update(visible="hidden"),
            self.status: f"Frame {i}: paint over the object, then press Apply drawing.",
        }

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

    # -- tracking, playing and downloads --------------------------------------------------------------------

    @reports_errors
    def on_track(self, session: TrackSession, start: Any, side: Any, cuts: Any = True) -> Iterator[dict]:
        last: Optional[TrackUpdate] = None
        updates = session.track(self.engine, start, short_side_value(side), cuts=cuts is not False)
        try:
            yield {
                **self._brush_off(),
                self.status: f"Tracking from frame {start}... (Stop ends it after the current frame)",
                self.fps_text: "",
                self.masks_file: gr.update(value=None, visible=False),  # they would no longer match the masks
                self.video_file: gr.update(value=None, visible=False),
            }
            for u in updates:
                last = u
                yield {self.frame_image: u.display, self.frame_slider: u.index, self.fps_text: _fps_line(u)}
        finally:
            updates.close()  # a cancelled event must still end the session's tracking state
        yield self._track_end(session, int(start), last)

    def _track_end(self, session: TrackSession, start: int, last: Optional[TrackUpdate]) -> dict:
        """The status, slider and viewer once a tracking run ends: done, stopped or paused at a scene cut."""
        if session.cut_at is not None:
            k = session.cut_at
            done = f" after {last.frames_done} frames" if last is not None else ""
            return {
                self.status: f"Scene cut at frame {k}: tracking paused{done}. The new shot starts here: click "
                "its objects (or press New object), then Track to continue.",
                self.frame_slider: k,
                self.frame_image: session.view(k),
                self.fps_text: _fps_line(last) if last is not None else "",
            }
        if last is None:
            return {self.status: f"Stopped at frame {start}, before the first tracked frame."}
        end = "Stopped" if last.index < last.total - 1 else "Done"
        session.mark_shown(last.index)  # the viewer shows its overlay, which is that frame's render
        # the last frame's picture, slider and fps line again with the status: the page's final state agrees
        # even if it missed an update (the picture is the same cached file: AtomicImage, nothing rewritten)
        return {
            self.status: f"{end} at frame {last.index} ({last.frames_done} frames at {last.fps:.1f} fps). "
            "Correct any frame and track again from it, or download the results.",
            self.frame_slider: last.index,
            self.frame_image: last.display,
            self.fps_text: _fps_line(last),
        }

    @reports_errors
    def on_play(self, session: TrackSession, start: Any) -> Iterator[dict]:
        i = session.check_frame(start)
        yield {**self._brush_off(), self.status: "Playing... (Stop pauses)"}
        for i in session.play(start):
            yield {self.frame_image: session.view(i), self.frame_slider: i}
        yield {self.status: f"Paused at frame {i}."}

    def on_stop(self, session: TrackSession) -> dict:
        running = session.tracking or session.playing
        message = session.stop()
        # what was running says where it stopped, in its last update: this answer may reach the page after
        # that one and must not replace it
        return {self.status: gr.skip() if running else message}

    @reports_errors
    def on_download_masks(self, session: TrackSession) -> dict:
        path = session.export_masks()
        n = len(session.require_video())
        return {self.masks_file: str(path), self.status: f"Masks of {n} frames: {path.name}."}

    @reports_errors
    def on_download_video(self, session: TrackSession) -> dict:
        path = session.export_video()
        return {self.video_file: str(path), self.status: f"Overlay video: {path.name}."}


def _fps_line(u: TrackUpdate) -> str:
    """The line under the viewer while tracking: speed and the frame shown, numbered as the slider is."""
    frame = f"frame {u.index} of 0–{u.total - 1}"
    return f"{u.fps:.1f} fps · {frame} · {u.step_seconds * 1e3:.0f} ms model + propagation"


def _wire(tab: TrackTab, pca_slider: gr.Slider) -> None:
    """Register the tab's loading and selecting events. ``pca_slider``: the Features tab's frame slider."""
    tab.pca_slider = pca_slider
    s = tab.state
    view = tab.view_outputs()
    edit = [tab.frame_image, tab.status, tab.object_dd]
    tab.load_sample_btn.click(tab.on_load_sample, [s, tab.sample_dd], view, api_name="load_sample")
    tab.video_upload.upload(tab.on_load_video, [s, tab.video_upload], [*view, tab.video_upload], api_name="load_video")
    tab.load_dir_btn.click(tab.on_load_frames, [s, tab.frames_dir], view, api_name="load_frames")
    tab.frames_dir.submit(tab.on_load_frames, [s, tab.frames_dir], view, api_visibility="undocumented")
    tab.sample_gt_btn.click(tab.on_sample_annotation, [s, tab.frame_slider], edit, api_name="sample_annotation")
    shown = [tab.frame_image, tab.brush_editor, tab.status]
    # .input: every keystroke in the number box and every step of a drag shows its frame at once (always_last:
    # a frame asked for while one is being drawn is not dropped); .release (blur, pointer up) is then a no-op
    # unless the frame changed meanwhile
    show_inputs = [s, tab.frame_slider, tab.brush_toggle]
    tab.frame_slider.input(tab.on_show_frame, show_inputs, shown, api_name="show_frame", trigger_mode="always_last",
                           show_progress="hidden")
    tab.frame_slider.release(tab.on_release_frame, show_inputs, shown, api_visibility="undocumented",
                             trigger_mode="always_last", show_progress="hidden")
    clicks = [s, tab.frame_slider, tab.object_dd, tab.click_mode, tab.threshold, tab.resolution]
    tab.click_btn.click(tab.on_click, [*clicks, tab.click_x, tab.click_y], edit, api_name="click")
    # "multiple": a second click made while the first is computed is queued, not dropped (the session
    # serialises them)
    tab.frame_image.select(tab.on_click_select, clicks, edit, api_name="click_select", api_visibility="undocumented",
                           trigger_mode="multiple")
    tab.new_object_btn.click(tab.on_new_object, [s], [tab.object_dd, tab.status], api_name="new_object")
    tab.clear_object_btn.click(tab.on_clear_object, [s, tab.frame_slider, tab.object_dd], edit, api_name="clear_object")
    tab.brush_toggle.input(
        tab.on_brush_toggle, [s, tab.frame_slider, tab.brush_toggle],
        [tab.brush_toggle, tab.brush_editor, tab.brush_tools, tab.frame_image, tab.status], api_name="brush_mode",
    )
    tab.use_brush_btn.click(
        tab.on_brush, [s, tab.frame_slider, tab.object_dd, tab.brush_editor, tab.brush_action],
        [*edit, tab.brush_editor], api_name="use_brush",
    )
    tab.mask_upload.upload(
        tab.on_mask_upload, [s, tab.frame_slider, tab.object_dd, tab.mask_upload], edit, api_name="upload_mask"
    )
    _wire_tracking(tab)


def _wire_tracking(tab: TrackTab) -> None:
    s = tab.state
    running = [tab.frame_image, tab.fps_text, tab.status, tab.frame_slider, tab.masks_file, tab.video_file,
               tab.brush_toggle, tab.brush_editor, tab.brush_tools]
    tab.track_btn.click(
        tab.on_track, [s, tab.frame_slider, tab.resolution, tab.pause_at_cuts], running, api_name="track",
        show_progress="hidden",
    )
    tab.play_btn.click(
        tab.on_play, [s, tab.frame_slider],
        [tab.frame_image, tab.frame_slider, tab.status, tab.brush_toggle, tab.brush_editor, tab.brush_tools],
        api_name="play", show_progress="hidden",
    )
    tab.stop_btn.click(tab.on_stop, [s], [tab.status], api_name="stop", concurrency_limit=None, show_progress="hidden")
    # the file is the endpoint's plain output (what API clients download); showing it is a step of its own
    for btn, fn, file, name in (
        (tab.download_masks_btn, tab.on_download_masks, tab.masks_file, "download_masks"),
        (tab.download_video_btn, tab.on_download_video, tab.video_file, "download_video"),
    ):
        btn.click(fn, [s], [file, tab.status], api_name=name).then(
            _shown_if_set, [file], [file], api_visibility="private", show_progress="hidden"
        )


def _shown_if_set(path: Any) -> Any:
    """A download's gr.File appears once it holds a file (it is hidden while nothing is offered)."""
    return gr.update(visible=bool(path))
