"""The Gradio app in a real browser: Playwright (sync API) drives Debian's Chromium headless.

Nothing is downloaded: Chromium comes from apt (``chromium``; ``DENSEKIT_CHROMIUM`` overrides the path) and
Playwright launches it through ``executable_path``. The app (``build_app``, default model efficientnet_lite0)
runs on a free port over a small embedded sample (2 sequences of 12 frames, 256x144, processing short side
144), so a tracking run is a few seconds on 2 quiet cores. Elements are found by their elem_ids (set in the
tab modules densekit.apps.app.tab_*, the contract with this test): Gradio 6 puts ``elem_id`` on the
component's wrapper, so the test reaches inside (``#frame-image img``).

What is checked, as a person would do it: pick a sample in the dropdown, load it, click the object on the
first frame, track, watch the live overlay play in the same viewer and the fps text, download the masks zip
and score it against the sample's ground truth (DAVIS J, the official region similarity); tracking again or
loading another video takes the stale download away and resets the click mode; a page with no video shows
the three steps and a click on it says what is missing; a frame number typed in the slider's box is shown at
once and the next click selects on it, and Play walks the frames; at 1280x800 the viewer, its status and
slider and every control of a session are visible without scrolling (bounding boxes), and the brush editor
appears only when asked for; 20 Stop/Track cycles never leave a broken picture in the viewer; tracking a
video made of two sample clips pauses at the cut, and goes on after a new click on the new shot; two pages
(two browser contexts, two sessions) tracking different videos at once keep their own state; a denied
webcam says so in the page; a granted (fake) webcam streams.

A screenshot of the Track tab after tracking, at 1280x800 as a person sees it, is kept in ``tests/artifacts/``
(or ``$DENSEKIT_ARTIFACTS``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import socket
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# find_spec, not an import: collection (every xdist worker collects every file) does not pay for gradio
if importlib.util.find_spec("gradio") is None:
    pytest.skip("gradio is not installed (pip install 'densekit[app]')", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError  # noqa: E402


def _find_chromium() -> str | None:
    for cand in (os.environ.get("DENSEKIT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (or set DENSEKIT_CHROMIUM)"),
    pytest.mark.slow,
]

SIDE = 144  # processing short side: the frames' own height
FRAMES = 12  # frames per sample sequence: 11 tracked frames, so the live overlay changes many times
# J floors. The clicked object (the sample's first sequence) scores J ~0.77 (frame-0 click IoU ~0.82) on this
# CPU; what a broken app gives stays far below 0.5: an empty mask J=0, the whole frame J<=0.07, the first
# mask left where it was (no tracking) J<=0.06 for that object. 0.5 is also tests/test_app.py's floor.
FLOOR_CLICK = 0.5  # IoU of the one-click selection with the object, frame 0
FLOOR_J = 0.5  # mean J of the tracked frames after the click
# The two-session test tracks the second sequence too, whose objects touch each other on a dark starfield:
# seeded with the exact ground truth its largest object still only reaches J ~0.54 (a property of
# single-reference propagation at 144 px, not of the app). Mixed sessions would give a session the other
# video's masks: J ~0 against its own truth. 0.3 separates the two with margin.
FLOOR_ISOLATION = 0.3
TIMEOUT_MS = int(os.environ.get("DENSEKIT_BROWSER_TIMEOUT_MS", 180_000))  # per wait: the 2 cores may be shared
FPS_RE = re.compile(r"(\d+(?:\.\d+)?)\s*fps", re.I)
FRAME_RE = re.compile(r"frame\s+(\d+)\s+of\s+0\D(\d+)", re.I)  # the fps line: "frame 7 of 0–11"
VIEWPORT = {"width": 1280, "height": 800}  # the window every page is tested in
DENIED_RE = re.compile(r"denied|not allowed|permission|blocked", re.I)


# ------------------------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _artifacts_dir() -> Path:
    d = Path(os.environ.get("DENSEKIT_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _steady_objects(gt: np.ndarray) -> list[int]:
    """Ground-truth ids visible in every frame, largest first in frame 0."""
    ids = [int(v) for v in np.unique(gt[0]) if v not in (0, 255) and all((g == v).any() for g in gt)]
    return sorted(ids, key=lambda v: -int((gt[0] == v).sum()))


def _deepest_point(mask: np.ndarray) -> tuple[int, int, float]:
    """(x, y) of the pixel of ``mask`` (H, W) bool farthest from its border, and that distance."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(x), int(y), float(dist.max())


def _j(gt: np.ndarray, pred: np.ndarray) -> float:
    """DAVIS region similarity J of two (H, W) bool masks (both empty counts as 1, as DAVIS does)."""
    from densekit.retrieval.davis_eval import db_eval_iou

    return float(db_eval_iou(gt.astype(np.uint8), pred.astype(np.uint8)))


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    """{frame name: (H, W) uint8 ids} of a masks zip; every member must be a palette PNG."""
    from PIL import Image

    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            im = Image.open(io.BytesIO(zf.read(name)))
            assert im.mode == "P", f"{name} in the masks zip is a {im.mode} PNG, not a DAVIS palette PNG"
            out[Path(name).stem] = np.asarray(im)
    return out


def _initial_value(url: str, elem_id: str) -> str:
    """The value the app gives the component with ``elem_id`` when a page opens (Gradio's /config)."""
    with urllib.request.urlopen(url.rstrip("/") + "/config", timeout=60) as r:
        config = json.load(r)
    for c in config["components"]:
        if c.get("props", {}).get("elem_id") == elem_id:
            return str(c["props"].get("value") or "")
    raise AssertionError(f"the app has no #{elem_id}")


def _new_page(browser: Browser, url: str, loaded: bool = True, **context_args: Any) -> tuple[BrowserContext, Page]:
    """A page of the app in its own context (its own session), at 1280x800; ``loaded``: wait until the
    default sample the page loads on open is shown."""
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True, **context_args)
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    page.goto(url)
    expect(page.locator("#track-btn")).to_be_visible(timeout=TIMEOUT_MS)
    if loaded:
        expect(page.locator("#status-md")).to_contain_text("Loaded", timeout=TIMEOUT_MS)
    return ctx, page


def _shown_size(size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of the viewer's picture of frames of natural ``size`` = (W, H) (the app enlarges small videos)."""
    from densekit.apps.app.display import display_scale

    s = display_scale((size[1], size[0]))
    return round(size[0] * s), round(size[1] * s)


def _image_size(img) -> tuple[int, int]:
    """Natural (width, height) of an <img>, once it is decoded."""
    img.wait_for(state="visible")
    w, h = img.evaluate("async e => { await e.decode(); return [e.naturalWidth, e.naturalHeight]; }")
    return int(w), int(h)


def _natural_width(img, wait_ms: int = 15_000) -> int:
    """The <img>'s natural width once it has loaded; 0 for a picture still broken after ``wait_ms`` (a
    picture being replaced is not broken: decode() also rejects when the src changes meanwhile)."""
    try:
        img.page.wait_for_function(
            "e => e && e.complete && e.naturalWidth > 0", arg=img.element_handle(), timeout=wait_ms
        )
    except PlaywrightTimeoutError:
        return 0
    return int(img.evaluate("e => e.naturalWidth"))


def _click_pixel(img, x: float, y: float, size: tuple[int, int]) -> None:
    """Click an <img> at pixel (x, y) of the video frame it shows (natural frame ``size`` = (W, H)).

    The picture is the frame scaled for display, then shown scaled (and centred when the box's aspect
    differs), so the point is mapped the way Gradio 6's image select handler maps it back:
    r = min(box w / natural w, box h / natural h, 1).
    """
    nw, nh = _image_size(img)
    x, y = x * nw / size[0], y * nh / size[1]
    box = img.bounding_box()
    assert box is not None, "the image is not laid out"
    r = min(box["width"] / nw, box["height"] / nh, 1.0)
    ox, oy = (box["width"] - nw * r) / 2, (box["height"] - nh * r) / 2
    img.click(position={"x": ox + x * r, "y": oy + y * r})


def _load_sample(page: Page, name: str, size: tuple[int, int]) -> None:
    """Choose ``name`` in the sample dropdown, load it, wait for its first frame (natural ``size`` = (W, H))."""
    dd = page.locator("#sample-dropdown")
    dd.locator("input").click()
    dd.get_by_role("option", name=name, exact=True).click()
    expect(dd.locator("input")).to_have_value(name, timeout=TIMEOUT_MS)
    old = page.locator("#status-md").inner_text()
    assert f"Loaded {name}:" not in old, "load another sample than the one shown (the status would not change)"
    page.locator("#load-sample-btn").click()
    page.wait_for_function(
        "([old, name]) => { const t = document.querySelector('#status-md').innerText;"
        " return t !== old && t.includes('Loaded ' + name + ':'); }",
        arg=[old, name], timeout=TIMEOUT_MS,
    )
    img = page.locator("#frame-image img")
    expect(img).to_be_visible(timeout=TIMEOUT_MS)
    assert _image_size(img) == _shown_size(size), "the frame shown is not the sample's frame"


def _load_server_path(page: Page, path: Path) -> None:
    """Load a frames folder through the (folded) server-path box and wait for the load's status."""
    box = page.locator("#frames-dir textarea, #frames-dir input").first
    if not box.is_visible():
        page.locator("#server-path").get_by_text("A frames folder or video file on the server").click()
    box.fill(str(path))
    old = page.locator("#status-md").inner_text()
    page.locator("#load-dir-btn").click()
    page.wait_for_function(
        "old => { const t = document.querySelector('#status-md').innerText; return t !== old && /Loaded/.test(t); }",
        arg=old, timeout=TIMEOUT_MS,
    )


def _toasts(page: Page) -> list[str]:
    return [" ".join(t.split()) for t in page.locator('[data-testid="toast-body"]').all_inner_texts()]


def _no_error_toast(page: Page) -> None:
    """No event of the page failed (Gradio shows an "Error" toast; the app's own refusals are warnings)."""
    errors = [t for t in _toasts(page) if re.match(r"\s*error", t, re.I) or "Internal error" in t]
    assert not errors, errors


def _wait_src_change(page: Page, selector: str, old: str | None) -> None:
    """Wait until the <img> at ``selector`` shows a new picture; fail early, with the app's words, when a
    new warning toast comes instead (a refused click or upload)."""
    before = _toasts(page)
    outcome = page.wait_for_function(
        """([sel, old, before]) => {
            const i = document.querySelector(sel);
            if (i && i.src && i.src !== old) return 'changed';
            const t = [...document.querySelectorAll('[data-testid="toast-body"]')]
                .map(e => e.innerText.split(/\\s+/).join(' ').trim()).filter(x => !before.includes(x));
            return t.length ? t.join(' | ') : false;
        }""",
        arg=[selector, old, before], timeout=TIMEOUT_MS,
    ).json_value()
    assert outcome == "changed", f"{selector} did not change; the page says: {outcome}"


def _watch(page: Page) -> None:
    """Record, from now on, every distinct viewer picture, fps text and status line the page shows
    (window.__dk: srcs, texts, log of 's:<status>' / 'f:<fps text>' in the order they came)."""
    page.evaluate(
        """() => {
        const dk = window.__dk = {srcs: [], texts: [], log: []};
        const tab = document.querySelector('#tab-track') || document.body;
        const fp = document.querySelector('#fps-text'), st = document.querySelector('#status-md');
        const rec = () => {
            const im = document.querySelector('#frame-image img');
            if (im && im.src && dk.srcs[dk.srcs.length - 1] !== im.src) dk.srcs.push(im.src);
            const t = fp.innerText.trim();
            if (t && dk.texts[dk.texts.length - 1] !== t) { dk.texts.push(t); dk.log.push('f:' + t); }
            const s = st.innerText.trim();
            if (s && dk.last_status !== s) { dk.last_status = s; dk.log.push('s:' + s); }
        };
        new MutationObserver(rec).observe(tab, {subtree: true, childList: true, attributes: true, characterData: true});
    }"""
    )


def _wait_log(page: Page, start: int, pattern: str) -> str:
    """Wait until an entry of window.__dk.log from index ``start`` on matches ``pattern``; that entry."""
    return page.wait_for_function(
        "([start, pat]) => window.__dk.log.slice(start).find(e => new RegExp(pat).test(e)) || false",
        arg=[start, pattern], timeout=TIMEOUT_MS,
    ).json_value()


def _text_match(page: Page, selector: str, pattern: str) -> list[str]:
    """Wait until the text of ``selector`` matches ``pattern``; its groups, read in the same instant (the
    page's Markdown lines render one after the other, so a second read may see another moment)."""
    return page.wait_for_function(
        """([sel, pat]) => { const e = document.querySelector(sel);
            const m = e && new RegExp(pat).exec(e.innerText); return m ? m.slice(1) : false; }""",
        arg=[selector, pattern], timeout=TIMEOUT_MS,
    ).json_value()


def _wait_tracked(page: Page, n: int) -> None:
    """Wait until the status says tracking is done at the last frame (frame n - 1, numbered from 0)."""
    expect(page.locator("#status-md")).to_contain_text(f"Done at frame {n - 1}", timeout=TIMEOUT_MS)


def _track_from(page: Page, frame: int) -> None:
    """Type ``frame`` in the slider's number box and press Track."""
    _type_frame(page, frame)
    page.locator("#track-btn").click()


def _type_frame(page: Page, frame: int) -> None:
    """Type a frame number in the slider's box (no Enter, no blur)."""
    box = page.locator("#frame-slider input[type=number]")
    box.click()
    box.fill(str(frame))  # replaces what the box held (an input event, and the box keeps the focus)


def _download_masks(page: Page, dest: Path) -> Path:
    """Press the masks download button and save the file its gr.File offers (a real browser download)."""
    page.locator("#download-masks-btn").click()
    link = page.locator("#masks-file a[href*='.zip']")
    expect(link).to_be_visible(timeout=TIMEOUT_MS)
    with page.expect_download() as info:
        link.click()
    info.value.save_as(dest)
    return dest


def _upload_mask(page: Page, path: Path) -> None:
    old = page.locator("#frame-image img").get_attribute("src")
    with page.expect_file_chooser() as chooser:  # an upload button: its file input is not inside #mask-upload
        page.locator("#mask-upload").click()
    chooser.value.set_files(str(path))
    _wait_src_change(page, "#frame-image img", old)  # the frame is shown again with the mask overlaid


def _in_view(page: Page, selector: str) -> dict:
    """The element's bounding box, asserting it lies inside the 1280x800 window with the page not scrolled."""
    el = page.locator(selector).first
    expect(el).to_be_visible(timeout=TIMEOUT_MS)
    box = el.bounding_box()
    assert box is not None, f"{selector} is not laid out"
    assert page.evaluate("() => [window.scrollX, window.scrollY]") == [0, 0]
    inside = box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"]
    assert inside and box["y"] + box["height"] <= VIEWPORT["height"], f"{selector} at {box}: outside 1280x800"
    return box


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from densekit.apps.app import build_app
    from densekit.serve.davis import DavisRoot
    from densekit.serve.sample import make_sample

    sample = make_sample(tmp_path_factory.mktemp("browser") / "sample", sequences=2, frames=FRAMES, height=144, width=256)
    demo = build_app("efficientnet_lite0", samples_dir=sample, short_side=SIDE, max_frames=40)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    root = DavisRoot(sample)
    try:
        yield SimpleNamespace(url=url, root=root, seqs=root.sequences())
    finally:
        demo.close()


@pytest.fixture(scope="module")
def bare_app(app) -> Iterator[str]:
    """The app without samples (a page that opens on nothing); the model is the one ``app`` loaded."""
    from densekit.apps.app import build_app

    demo = build_app("efficientnet_lite0", samples_dir=None, short_side=SIDE, max_frames=40)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start (Playwright adds it
            # too unless chromiumSandbox=True); --disable-dev-shm-usage: containers have a 64 MB /dev/shm;
            # --use-fake-device-for-media-stream: a synthetic camera, granted or denied per context through
            # its permissions (no --use-fake-ui-for-media-stream, which would grant every context).
            args=["--no-sandbox", "--disable-dev-shm-usage", "--use-fake-device-for-media-stream"],
        )
        try:
            yield b
        finally:
            b.close()


# -------------------------------------------------------------------------------------------------- tests


def test_click_track_download_and_score(app, browser: Browser, tmp_path: Path) -> None:
    """The whole session in one viewer; then tracking again, or loading another video, takes the stale
    download away and puts the click mode back to Positive."""
    seq = app.seqs[0]
    gt = app.root.read_gt(seq)
    names = app.root.frame_names(seq)
    n, (H, W) = len(gt), gt.shape[1:]
    ctx, page = _new_page(browser, app.url)
    try:
        # the page opened on the first sample, chosen in the dropdown
        expect(page.locator("#sample-dropdown input")).to_have_value(seq)
        expect(page.locator("#status-md")).to_contain_text(f"Loaded {seq}:")
        assert _image_size(page.locator("#frame-image img")) == _shown_size((W, H))
        obj = max(_steady_objects(gt), key=lambda o: _deepest_point(gt[0] == o)[2])
        x, y, _ = _deepest_point(gt[0] == obj)
        frame_img = page.locator("#frame-image img")
        old = frame_img.get_attribute("src")
        _click_pixel(frame_img, x, y, (W, H))
        _wait_src_change(page, "#frame-image img", old)  # the frame comes back with the selection overlaid

        _watch(page)
        page.locator("#track-btn").click()
        _wait_tracked(page, n)
        seen = page.evaluate("window.__dk")
        fps_texts = [t for t in seen["texts"] if FRAME_RE.search(t) and FPS_RE.search(t)]
        assert len(seen["srcs"]) >= 3, f"the viewer changed only {len(seen['srcs'])} times while tracking"
        assert len(fps_texts) >= 3, f"fps text while tracking: {seen['texts']}"
        assert float(FPS_RE.search(fps_texts[-1]).group(1)) > 0, fps_texts[-1]
        # one frame numbering: the status, the fps line and the slider name the same last frame
        assert FRAME_RE.search(fps_texts[-1]).groups() == (str(n - 1), str(n - 1)), fps_texts[-1]
        expect(page.locator("#frame-slider input[type=number]")).to_have_value(str(n - 1))
        assert _natural_width(frame_img) > 0

        masks = _read_zip(_download_masks(page, tmp_path / "masks.zip"))
        # the artefact: the Track tab as a person sees it after tracking (overlay, fps line, the zip offered)
        shot = _artifacts_dir() / "app_browser_track.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000

        # tracking again: the zip of the last run is no longer offered, from the moment Track is pressed
        _track_from(page, 0)
        expect(page.locator("#masks-file")).to_be_hidden(timeout=TIMEOUT_MS)
        _wait_tracked(page, n)
        expect(page.locator("#masks-file")).to_be_hidden()
        # another video: downloads, click mode and objects are the new video's
        _download_masks(page, tmp_path / "again.zip")
        page.locator("#click-mode").get_by_text("Negative").click()
        page.locator("#new-object-btn").click()
        expect(page.locator("#object-dropdown input")).to_have_value(re.compile("object 2"))
        _load_sample(page, app.seqs[1], (W, H))
        expect(page.locator("#masks-file")).to_be_hidden()
        expect(page.locator("#click-mode input[value=Positive]")).to_be_checked()
        expect(page.locator("#object-dropdown input")).to_have_value(re.compile("object 1"))
    finally:
        ctx.close()

    assert sorted(masks) == sorted(names), "the zip must hold one PNG per frame, named like the frames"
    pred = np.stack([masks[k] for k in names])
    assert pred.shape == gt.shape
    click_iou = _j(gt[0] == obj, pred[0] == 1)
    js = [_j(gt[i] == obj, pred[i] == 1) for i in range(1, n)]
    frozen = np.mean([_j(gt[i] == obj, gt[0] == obj) for i in range(1, n)])
    assert click_iou >= FLOOR_CLICK, f"one click selected IoU {click_iou:.3f} of object {obj}"
    assert np.mean(js) >= FLOOR_J, f"tracked J mean {np.mean(js):.3f} (first mask left in place: {frozen:.3f}); per frame {np.round(js, 2)}"


def test_empty_page_shows_the_steps_and_a_click_says_what_is_missing(bare_app, browser: Browser) -> None:
    ctx, page = _new_page(browser, bare_app, loaded=False)  # an app without samples: nothing loads on open
    try:
        status = page.locator("#status-md")
        expect(status).to_contain_text(re.compile(r"1\s*Load a video.*2\s*Click.*3\s*Press\s*Track", re.S))
        img = page.locator("#frame-image img")
        assert _natural_width(img) > 0  # the viewer shows the same three steps, and takes a click
        img.click()
        expect(status).to_contain_text("Load a video first", timeout=TIMEOUT_MS)
        page.locator("#track-btn").click()
        expect(status).to_contain_text("Load a video first", timeout=TIMEOUT_MS)
        _no_error_toast(page)
    finally:
        ctx.close()


def test_typed_frame_is_shown_at_once_and_the_next_click_selects_on_it(app, browser: Browser) -> None:
    seq = app.seqs[0]
    gt = app.root.read_gt(seq)
    (H, W), k = gt.shape[1:], 7
    obj = max(_steady_objects(gt), key=lambda o: _deepest_point(gt[k] == o)[2])
    x, y, _ = _deepest_point(gt[k] == obj)
    ctx, page = _new_page(browser, app.url)
    try:
        img = page.locator("#frame-image img")
        old = img.get_attribute("src")
        _type_frame(page, k)
        # shown while the box still has the focus (before any blur or Enter)
        _wait_src_change(page, "#frame-image img", old)
        assert page.evaluate("() => document.activeElement && document.activeElement.type") == "number"
        expect(page.locator("#status-md")).to_contain_text(f"Frame {k}: no object")
        shown = img.get_attribute("src")
        _click_pixel(img, x, y, (W, H))  # this click also blurs the box: it must not be swallowed
        expect(page.locator("#status-md")).to_contain_text(f"Frame {k}: positive click", timeout=TIMEOUT_MS)
        _wait_src_change(page, "#frame-image img", shown)
        # Play walks the frames in the viewer and the slider follows; Stop pauses it
        _type_frame(page, 0)
        expect(page.locator("#status-md")).to_contain_text("Frame 0:", timeout=TIMEOUT_MS)
        page.locator("#play-btn").click()
        page.wait_for_function(
            "() => +document.querySelector('#frame-slider input[type=number]').value >= 3", timeout=TIMEOUT_MS
        )
        page.locator("#stop-btn").click()
        paused = int(_text_match(page, "#status-md", r"Paused at frame (\d+)")[0])
        expect(page.locator("#frame-slider input[type=number]")).to_have_value(str(paused))
        _no_error_toast(page)
    finally:
        ctx.close()


def test_viewer_and_controls_fit_1280x800_and_the_brush_comes_when_asked(app, browser: Browser) -> None:
    ctx, page = _new_page(browser, app.url)
    try:
        viewer = _in_view(page, "#frame-image img")
        status = _in_view(page, "#status-md")
        track = _in_view(page, "#track-btn")
        for sel in ("#frame-slider", "#stop-btn", "#play-btn", "#object-dropdown", "#new-object-btn", "#click-mode",
                    "#brush-toggle", "#download-masks-btn", "#download-video-btn", "#sample-dropdown",
                    "#load-sample-btn", "#video-upload"):
            _in_view(page, sel)
        assert track["x"] >= viewer["x"] + viewer["width"] - 1, "the controls sit beside the viewer"
        assert status["y"] + status["height"] <= viewer["y"] + 1, "the status line sits right above the viewer"
        assert viewer["width"] >= 500 and viewer["height"] >= 250, f"a small viewer: {viewer}"
        expect(page.locator("#brush-editor")).to_be_hidden()
        page.locator("#brush-toggle input").check()
        editor = _in_view(page, "#brush-editor")  # in the viewer's place
        expect(page.locator("#frame-image")).to_be_hidden()
        _in_view(page, "#use-brush-btn")
        assert abs(editor["x"] - viewer["x"]) < 40 and editor["y"] < viewer["y"] + 100, (editor, viewer)
        page.locator("#brush-toggle input").uncheck()
        expect(page.locator("#brush-editor")).to_be_hidden(timeout=TIMEOUT_MS)
        _in_view(page, "#frame-image img")
        _no_error_toast(page)
    finally:
        ctx.close()


class _ServerErrors(logging.Handler):
    """Log records of the (in-process) server that tell of a truncated or failed response."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        if re.search(r"Content-Length|LocalProtocolError|Exception in ASGI", text):
            self.seen.append(text.strip().splitlines()[-1])


def test_twenty_stop_track_cycles_never_break_the_viewer(app, browser: Browser) -> None:
    cycles = 20
    errors = _ServerErrors()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error")]  # uvicorn's do not propagate
    for lg in loggers:
        lg.addHandler(errors)
    ctx, page = _new_page(browser, app.url)
    try:
        page.locator("#sample-gt-btn").click()  # the sample's own masks of frame 0: a quick selection
        expect(page.locator("#status-md")).to_contain_text("the sample's", timeout=TIMEOUT_MS)
        _watch(page)
        img = page.locator("#frame-image img")
        ends = []
        for c in range(cycles):
            mark = page.evaluate("window.__dk.log.length")
            _track_from(page, 0)
            _wait_log(page, mark, r"^f:.*fps|^s:(Stopped|Done) at frame")  # a tracked frame is on screen
            page.locator("#stop-btn").click()
            end = _wait_log(page, mark, r"^s:(Stopped|Done) at frame \d+")
            width = _natural_width(img)
            assert width > 0, f"cycle {c + 1}: the viewer shows a broken picture after '{end}'"
            # (that the fps line and the status name the same frame is checked through the API, in
            # tests/test_app.py: under load this page's fps Markdown can be left showing an earlier update)
            ends.append(end.split(" (")[0])
        assert len(ends) == cycles
        _no_error_toast(page)
    finally:
        ctx.close()
        for lg in loggers:
            lg.removeHandler(errors)
    assert not errors.seen, f"the server failed responses: {errors.seen[:3]}"


def test_scene_cut_pauses_tracking_and_it_goes_on_after_a_new_click(app, browser: Browser, tmp_path: Path) -> None:
    """A video made of the two sample clips one after the other: tracking stops at the first frame of the
    second, says so, shows it; a click there and Track go on to the end."""
    from PIL import Image

    from densekit.serve.imageio import read_image, write_mask

    a, b = app.seqs[:2]
    folder = tmp_path / "two-shots"
    folder.mkdir()
    paths = app.root.frame_paths(a) + app.root.frame_paths(b)
    for k, p in enumerate(paths):
        Image.fromarray(read_image(p)).save(folder / f"{k:05d}.png")
    cut, n = len(app.root.frame_paths(a)), len(paths)
    gt_a, gt_b = app.root.read_gt(a), app.root.read_gt(b)
    obj_a = _steady_objects(gt_a)[0]
    write_mask(tmp_path / "first.png", (gt_a[0] == obj_a).astype(np.uint8))
    obj_b = max(_steady_objects(gt_b), key=lambda o: _deepest_point(gt_b[0] == o)[2])
    x, y, _ = _deepest_point(gt_b[0] == obj_b)
    H, W = gt_a.shape[1:]
    ctx, page = _new_page(browser, app.url)
    try:
        _load_server_path(page, folder)
        _upload_mask(page, tmp_path / "first.png")
        img = page.locator("#frame-image img")
        page.locator("#track-btn").click()
        status = page.locator("#status-md")
        expect(status).to_contain_text(f"Scene cut at frame {cut}", timeout=TIMEOUT_MS)
        expect(page.locator("#frame-slider input[type=number]")).to_have_value(str(cut))
        old = img.get_attribute("src")
        _click_pixel(img, x, y, (W, H))
        expect(status).to_contain_text(f"Frame {cut}: positive click", timeout=TIMEOUT_MS)
        _wait_src_change(page, "#frame-image img", old)
        page.locator("#track-btn").click()
        _wait_tracked(page, n)
        masks = _read_zip(_download_masks(page, tmp_path / "masks.zip"))
    finally:
        ctx.close()
    names = sorted(masks)
    assert len(names) == n and all(masks[names[i]].any() for i in range(n)), "every frame of both shots holds a mask"
    first = np.mean([_j(gt_a[i] == obj_a, masks[names[i]] == 1) for i in range(1, cut)])
    assert first >= FLOOR_J, f"first shot: J {first:.3f}"
    # the click selected on the new shot's first frame, where it was made (how well one click fits an object
    # is apps/app/selection.py's matter, measured elsewhere: on this starfield clip it over-selects)
    assert masks[names[cut]][y, x] == 1, "the click on the new shot did not select on its first frame"


def test_two_sessions_track_different_videos_at_once(app, browser: Browser, tmp_path: Path) -> None:
    """Two pages at once, one loading a sample from the dropdown, the other the other sequence's frames folder;
    each uploads the first-frame mask of its own object (#mask-upload) and both track at the same time."""
    from densekit.serve.imageio import write_mask

    runs = []
    for k, seq in enumerate(app.seqs[:2]):
        gt = app.root.read_gt(seq)
        obj = _steady_objects(gt)[0]
        mask_png = tmp_path / f"first-{k}.png"
        write_mask(mask_png, (gt[0] == obj).astype(np.uint8))
        runs.append(SimpleNamespace(seq=seq, gt=gt, obj=obj, png=mask_png))
    assert runs[0].seq != runs[1].seq
    pages = []
    try:
        for k, r in enumerate(runs):  # each page its own browser context: its own cookies, its own Gradio session
            ctx, page = _new_page(browser, app.url)
            pages.append((ctx, page))
            H, W = r.gt.shape[1:]
            if k == 0:  # the sample the page opens on
                expect(page.locator("#status-md")).to_contain_text(f"Loaded {r.seq}:")
            else:  # the other way in: the sequence's frames folder on the server
                _load_server_path(page, app.root.frame_paths(r.seq)[0].parent)
                assert _image_size(page.locator("#frame-image img")) == _shown_size((W, H))
            _upload_mask(page, r.png)
        for _, page in pages:  # both run at the same time
            page.locator("#track-btn").click()
        for r, (_, page) in zip(runs, pages):
            _wait_tracked(page, len(r.gt))
            r.masks = _read_zip(_download_masks(page, tmp_path / f"masks-{r.seq}.zip"))
    finally:
        for ctx, _ in pages:
            ctx.close()

    for r in runs:
        names = app.root.frame_names(r.seq)
        assert sorted(r.masks) == sorted(names)
        pred = np.stack([r.masks[k] for k in names])
        assert np.array_equal(pred[0] == 1, r.gt[0] == r.obj), f"{r.seq}: frame 0 is not the mask this page uploaded"
        j = np.mean([_j(r.gt[i] == r.obj, pred[i] == 1) for i in range(1, len(names))])
        assert j >= FLOOR_ISOLATION, f"{r.seq}: J {j:.3f} against its own video's truth: sessions mixed?"


def test_denied_webcam_says_so_and_page_keeps_working(app, browser: Browser) -> None:
    # what #webcam-status says before anything happens (from the app's config: Gradio 6 puts a tab's content
    # in the page only when the tab opens, and the app may already react to that)
    initial = _initial_value(app.url, "webcam-status")
    ctx, page = _new_page(browser, app.url)  # no "camera" permission: getUserMedia fails with NotAllowedError
    try:
        page.locator("#tab-webcam-button").click()
        expect(page.locator("#webcam-status")).to_be_visible(timeout=TIMEOUT_MS)
        page.locator("#webcam-input").get_by_role("button", name=re.compile("access webcam", re.I)).click()
        try:
            page.wait_for_function(
                """([initial, pattern]) => {
                    const re = new RegExp(pattern, 'i'), norm = s => s.toLowerCase().replace(/[^0-9a-z]+/g, '');
                    const s = document.querySelector('#webcam-status').textContent;
                    const toasts = [...document.querySelectorAll('[data-testid="toast-body"]')].map(t => t.textContent);
                    return (norm(s) !== norm(initial) && re.test(s)) || toasts.some(t => re.test(t));
                }""",
                arg=[initial, DENIED_RE.pattern], timeout=60_000,
            )
        except PlaywrightTimeoutError:
            pytest.fail(
                "a denied webcam shows no message in the page within 60 s: #webcam-status still says "
                f"{' '.join(page.locator('#webcam-status').inner_text().split())!r}, toasts {_toasts(page)}"
            )
        # the session keeps working: the Track tab still answers
        page.locator("#tab-track-button").click()
        page.locator("#track-btn").click()
        # (the page opened on the default sample, where nothing is selected yet)
        expect(page.locator("#status-md")).to_contain_text("has no object", timeout=TIMEOUT_MS)
    finally:
        ctx.close()


def test_granted_webcam_streams_frames(app, browser: Browser) -> None:
    ctx, page = _new_page(browser, app.url, permissions=["camera"])  # Chromium's synthetic camera
    try:
        page.locator("#tab-webcam-button").click()
        cam = page.locator("#webcam-input")
        cam.get_by_role("button", name=re.compile("access webcam", re.I)).click()
        cam.get_by_role("button", name=re.compile("record|capture", re.I)).click()
        # the output picture is replaced as frames stream back: wait for one that has pixels
        page.wait_for_function(
            "() => { const i = document.querySelector('#webcam-output img'); return i && i.complete && i.naturalWidth > 0; }",
            timeout=TIMEOUT_MS,
        )
        # latency in milliseconds, whether #webcam-latency is a Markdown (text) or a Textbox (a field's value)
        page.wait_for_function(
            """() => { const e = document.querySelector('#webcam-latency');
                const f = e && e.querySelector('textarea, input');
                return /\\d+(\\.\\d+)?\\s*ms/.test((e ? e.innerText : '') + ' ' + (f ? f.value : '')); }""",
            timeout=TIMEOUT_MS,
        )
    finally:
        ctx.close()
