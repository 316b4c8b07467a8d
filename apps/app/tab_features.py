"""The Features tab: the first three PCA components of a loaded frame's dense features, as RGB."""

from typing import Any

import gradio as gr

from densekit.apps.app.atomic_image import AtomicImage
from densekit.apps.app.display import pca_picture
from densekit.apps.app.engine import Engine
from densekit.apps.app.handlers import reports_errors, short_side_value
from densekit.apps.app.track_session import TrackSession


class FeaturesTab:
    """The Features tab: it shows frames of the Track tab's video (``state``) at its processing size
    (``resolution``, the Track tab's dropdown)."""

    def __init__(self, engine: Engine, state: gr.State, resolution: gr.Dropdown) -> None:
        self.engine, self.state, self.resolution = engine, state, resolution
        with gr.Tab("Features", elem_id="tab-features"):
            self.status = gr.Markdown(
                "The first three principal components of the dense features of a frame of the loaded video, as RGB.",
                elem_id="pca-status",
            )
            self.slider = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="pca-frame-slider")
            self.show_btn = gr.Button("Show features", elem_id="pca-btn")
            self.image = AtomicImage(label="PCA of the features", interactive=False, format="jpeg", elem_id="pca-image")

    @reports_errors
    def on_pca(self, session: TrackSession, i: Any, side: Any) -> dict:
        i = session.check_frame(i)
        pic = pca_picture(self.engine, session.video.frame(i), short_side_value(side))  # type: ignore[union-attr]
        return {
            self.image: pic,
            self.status: f"Frame {i}: first three PCA components of {self.engine.model_label}'s features.",
        }

    def wire(self) -> None:
        inputs, outputs = [self.state, self.slider, self.resolution], [self.image, self.status]
        self.show_btn.click(self.on_pca, inputs, outputs, api_name="pca")
        self.slider.release(self.on_pca, inputs, outputs, api_name="pca_frame")
