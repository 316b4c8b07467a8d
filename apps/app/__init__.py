"""The densekit web app (Gradio 6): track objects through a video or the webcam, search segments, look at features.

``densekit app`` (apps/cmd_app.py) or :func:`build_app` then ``demo.launch()``. One model is loaded per process
(:func:`shared_extractor`) and shared by every browser session behind a lock; everything a session does lives
in its own :class:`TrackSession` / :class:`WebcamSession` held in ``gr.State``, so sessions never mix.

Rooms (modules of this package; only the ``tab_*`` modules and :mod:`.blocks`' ``build_app`` need Gradio):

* ``selection``: click -> mask (feature similarity against the border, GrabCut at the edge, connected part); brush and
  uploaded masks. numpy / SciPy / scikit-image / OpenCV only.
* ``engine``: the shared model behind one lock, the propagation preset, limits, samples, index opening.
* ``video``: a loaded video as a memory map; the masks zip. ``display``: labels, colours, fitting to the page,
  the header's plain words. ``scene_cut``: where a new shot begins (colour-histogram jump).
* ``track_session`` / ``webcam_session``: one browser session's state per tab, the tracking loops.
* ``search``: index building and search by a click.
* ``handlers``: the error-reporting decorator every handler uses (an exception becomes a warning toast and
  the tab's status line) and small value conversions.
* ``tab_track``, ``tab_webcam``, ``tab_search``, ``tab_features``: each builds its components and wires its
  events; ``blocks``: :func:`build_app`, which puts them together.

Tabs (element ids are the contract with the browser test, tests/test_app_browser.py):

* **Track**: one viewer (``#frame-image``) to click on and to watch tracking in, the controls beside it
  (fits a 1280x800 window). The default sample loads when a page opens (a page-load event that fills the
  session in place and gives way to any load the user asks for); load another sample, upload a video, or
  give a frames folder / video file on the server; pick objects on any frame (the slider, its number box
  and Play show a frame at once) by positive/negative clicks (:func:`click_mask`: each feature cell's similarity
  to the clicked cells against the frame's border cells, a second pass from the first region's core, GrabCut
  in a band at the edge, the connected part under the click; the message gives the area and a hint when
  a click covers most of the frame), by brush (``gr.ImageEditor``, in the viewer's place while "Brush" is
  ticked) or by uploading a mask; several objects, each its DAVIS colour. Tracking
  (:meth:`TrackSession.track`) is a generator: the viewer plays each tracked frame with frames per second
  and the slider follows; Stop ends it after the current frame; a scene cut (:mod:`.scene_cut`, a jump of
  the colour histogram) pauses it on the new shot's first frame, to select again there; correcting a mask
  on any frame and pressing Track again restarts the propagator from that frame (``reset_mask`` semantics:
  the corrected frame becomes the reference). Downloads: a zip of DAVIS palette PNGs (one per frame, named
  like the frames) and the overlay mp4, both written atomically, offered until the masks change by
  tracking or another video is loaded. Frames are numbered from 0 everywhere, like the frame files.
* **Webcam**: ``gr.Image(sources=["webcam"]).stream(...)``; capture a frame, click objects on it, start
  tracking: every streamed frame is propagated (:func:`webcam_step`), latency shown. Frames that arrive while
  the previous one is still being processed are dropped.
* **Search**: with ``--index DIR`` (or an index built from a folder in the app), click a region of an image:
  gallery of the nearest indexed segments, outlined, with scores.
* **Features**: the first three PCA components of the dense features of any frame as RGB (``pca_rgb``).

API endpoints (``gradio_client.Client(url).predict(..., api_name="/<name>")``; session state is kept per
client; frame/pixel coordinates are in the loaded video's pixels, after the ``max_side`` downscale):

=====================  ==========================================================  ===================================
api_name               inputs                                                      outputs
=====================  ==========================================================  ===================================
load_sample            sample name                                                 status, slider, frame, objects, ...
load_video             video file                                                  as load_sample
load_frames            frames folder (or video file) path on the server            as load_sample
sample_annotation      frame index (uses the sample's annotation of that frame)    frame, status, objects
show_frame             frame index[, brush shown]                                  frame, brush background, status
click                  frame, object id, "Positive"/"Negative", threshold (0 =     frame, status, objects
                       auto), processing short side, x, y
new_object             -                                                           objects dropdown, status
clear_object           frame, object id                                            frame, status, objects
brush_mode             frame, on (True/False)                                      brush on, editor, frame, status
use_brush              frame, object id, ImageEditor value, "Add"/"Erase"/"Replace" frame, status, objects, editor
upload_mask            frame, object id, mask PNG                                  frame, status, objects
track (generator)      start frame, processing short side[, pause at scene cuts]   frame (live), fps text, status,
                                                                                   slider, masks file, video file,
                                                                                   brush on, editor
play (generator)       start frame                                                 frame, slider, status, ...
stop                   -                                                           status (only when nothing runs:
                                                                                   track or play says where it ended)
download_masks         -                                                           zip file, status
download_video         -                                                           mp4 file, status
pca, pca_frame         frame index, processing short side                          PCA picture, status
build_index            index folder, images folder                                 index folder, status
search                 index folder, image, k, x, y                                gallery, query picture, status
webcam_frame (stream)  webcam frame, processing short side                         overlay, latency, status
webcam_capture         -                                                           captured frame, status
webcam_click           "Positive"/"Negative", object id, processing short side,    captured frame, status
                       x, y
webcam_new_object      -                                                           objects dropdown, status
webcam_track           processing short side                                       status
webcam_stop            -                                                           status
=====================  ==========================================================  ===================================

``click_select`` and ``search_select`` / ``webcam_select`` are the same as ``click`` / ``search`` /
``webcam_click`` driven by the image's ``.select`` event (undocumented endpoints: their coordinates come from
``gr.SelectData``, which a client cannot send).

For benchmarks and tests the pieces are importable without Gradio: :func:`click_mask` (click -> mask),
:class:`TrackSession` with :meth:`TrackSession.track` (the per-frame loop the app runs, yielding
:class:`TrackUpdate`), :func:`tracking_loop` (that loop on in-memory frames with any extractor and config),
:func:`webcam_step`, :func:`write_masks_zip`.

Security: the frames-folder box and the Search tab read paths on the server; the app binds to 127.0.0.1 by
default and has no authentication.
"""

from densekit.apps.app.blocks import build_app, launch_kwargs
from densekit.apps.app.display import DISPLAY_MAX_SIDE, MAX_OBJECT_ID, object_label, pca_picture
from densekit.apps.app.engine import (
    DEFAULT_MODEL,
    DEFAULT_PRESET,
    DEFAULT_SAMPLES_DIR,
    RESOLUTIONS,
    Engine,
    LockedExtractor,
    shared_extractor,
)
from densekit.apps.app.search import build_index, search_point
from densekit.apps.app.selection import (
    WORK_MAX_SIDE,
    Click,
    FrameRegions,
    brush_region,
    click_mask,
    fit_mask,
    frame_regions,
    select_region,
)
from densekit.apps.app.track_session import NO_VIDEO, TrackSession, TrackUpdate, tracking_loop
from densekit.apps.app.video import LoadedVideo, load_video, write_masks_zip
from densekit.apps.app.webcam_session import WebcamResult, WebcamSession, webcam_step

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRESET",
    "DEFAULT_SAMPLES_DIR",
    "DISPLAY_MAX_SIDE",
    "MAX_OBJECT_ID",
    "NO_VIDEO",
    "RESOLUTIONS",
    "WORK_MAX_SIDE",
    "Click",
    "Engine",
    "FrameRegions",
    "LoadedVideo",
    "LockedExtractor",
    "TrackSession",
    "TrackUpdate",
    "WebcamResult",
    "WebcamSession",
    "brush_region",
    "build_app",
    "build_index",
    "click_mask",
    "fit_mask",
    "frame_regions",
    "launch_kwargs",
    "load_video",
    "object_label",
    "pca_picture",
    "search_point",
    "select_region",
    "shared_extractor",
    "tracking_loop",
    "webcam_step",
    "write_masks_zip",
]
