"""The Search tab: build or update a segment index from a folder of images, click a query image's region."""

# No ``from __future__ import annotations``: Gradio reads ``gr.SelectData`` and ``gr.Progress`` parameters
# through typing.get_type_hints and the parameters' defaults.

from typing import Any

import gradio as gr

from densekit.apps.app.atomic_image import AtomicImage
from densekit.apps.app.engine import Engine
from densekit.apps.app.handlers import reports_errors
from densekit.apps.app.search import build_index, search_point


class SearchTab:
    """The Search tab's components (built in the constructor, inside the Blocks) and its handlers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with gr.Tab("Search", elem_id="tab-search"):
            self.status = gr.Markdown(
                "Give an index folder (or build one from a folder of images), choose a query image and "
                "click a region.",
                elem_id="search-status",
            )
            with gr.Row():
                self.index_dir = gr.Textbox(value=str(engine.index or ""), label="Index folder", elem_id="index-dir")
                self.images_dir = gr.Textbox(label="Images folder to index", elem_id="images-dir")
                self.build_btn = gr.Button("Build / update index", elem_id="build-index-btn")
            with gr.Row():
                self.image = gr.Image(
                    label="Query image: click a region", type="numpy", sources=["upload", "clipboard"],
                    elem_id="search-image",
                )
                self.query = AtomicImage(label="Query region", interactive=False, format="jpeg", elem_id="search-query")
            with gr.Row():
                self.k = gr.Slider(1, 24, value=8, step=1, label="Hits", elem_id="search-k")
                self.exclude = gr.Checkbox(
                    value=True, label="Leave the query's own image out", elem_id="search-exclude",
                    info="An indexed query image would be its own best hits.",
                )
            self.gallery = gr.Gallery(
                label="Nearest segments (each outlined and boxed in green)", columns=4, format="jpeg",
                elem_id="search-gallery",
            )
            self.x = gr.Number(visible=False, elem_id="search-x")
            self.y = gr.Number(visible=False, elem_id="search-y")
            self.search_btn = gr.Button(visible=False, elem_id="search-btn")

    @reports_errors
    def on_build_index(
        self,
        index_folder: Any,
        images_folder: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects the tracker through this default
    ) -> dict:
        root, msg = build_index(self.engine, images_folder, index_folder, progress)
        return {self.index_dir: root, self.status: msg}

    @reports_errors
    def on_search(self, index_folder: Any, image: Any, k: Any, x: Any, y: Any, exclude: Any = True) -> dict:
        items, query, msg = search_point(self.engine, index_folder, image, x, y, int(k or 8), exclude is not False)
        return {self.gallery: items, self.query: query, self.status: msg}

    def on_select(self, index_folder: Any, image: Any, k: Any, exclude: Any, evt: gr.SelectData) -> dict:
        return self.on_search(index_folder, image, k, evt.index[0], evt.index[1], exclude)

    def wire(self) -> None:
        results = [self.gallery, self.query, self.status]
        self.build_btn.click(
            self.on_build_index, [self.index_dir, self.images_dir], [self.index_dir, self.status],
            api_name="build_index",
        )
        self.search_btn.click(
            self.on_search, [self.index_dir, self.image, self.k, self.x, self.y, self.exclude], results,
            api_name="search",
        )
        self.image.select(
            self.on_select, [self.index_dir, self.image, self.k, self.exclude], results,
            api_name="search_select", api_visibility="undocumented",
        )
