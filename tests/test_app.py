"""The Gradio app, driven through its API with gradio_client against a launched server.

One app (efficientnet_lite0, the default model) is launched for the module on a small embedded sample
(144x256 frames, processing short side 144) so that tracking runs stay short on 2 shared cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from densekit.serve.imageio import open_video, read_mask, write_mask  # noqa: E402

SIDE = 144  # processing short side used by every call (the frames' own height)
FLOOR_CLICK = 0.5  # IoU of a one-click selection with the object's ground truth, frame 0
FLOOR_TRACK = 0.5  # mean J of a tracked object seeded with its ground-truth mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _centre(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixel deepest inside ``mask``."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(x), float(y)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _read_zip(path: str) -> dict[str, np.ndarray]:
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                from PIL import Image

                im = Image.open(f)
                assert im.mode == "P", f"{name} is not a palette PNG"
                out[Path(name).stem] = np.asarray(im)
    return out


def _mean_j(masks: dict[str, np.ndarray], gt: np.ndarray, obj: int, frames: range, gt_obj: int | None = None) -> float:
    """Mean region similarity J of app object ``obj`` against ground-truth object ``gt_obj`` (default: same id)."""
    g = obj if gt_obj is None else gt_obj
    return float(np.mean([_iou(masks[f"{i:05d}"] == obj, gt[i] == g) for i in frames]))


def _steady_objects(gt: np.ndarray) -> list[int]:
    """Ground-truth ids visible in every frame, largest first in frame 0 (objects that leave the frame make
    single-reference propagation keep a stale mask, which is a property of the method, not of the app)."""
    ids = [int(v) for v in np.unique(gt[0]) if v and all((g == v).any() for g in gt)]
    return sorted(ids, key=lambda v: -int((gt[0] == v).sum()))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("app") / "sample", sequences=2, frames=10, height=144, width=256)


@pytest.fixture(scope="module")
def app(sample: Path):
    from densekit.apps.app import build_app
    from densekit.serve.davis import DavisRoot

    demo = build_app("efficientnet_lite0", samples_dir=sample, short_side=SIDE, max_video_mb=0.2, max_frames=40)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    root = DavisRoot(sample)
    seqs = root.sequences()
    try:
        yield SimpleNamespace(demo=demo, url=url, engine=demo.engine, root=root, seqs=seqs)
    finally:
        demo.close()


def _client(app, downloads: Path):
    # generous HTTP timeouts: on 2 shared cores the server can take seconds to answer while models run
    return gradio_client.Client(app.url, verbose=False, download_files=str(downloads), httpx_kwargs={"timeout": 120})


@pytest.fixture()
def client(app, tmp_path: Path):
    return _client(app, tmp_path / "downloads")


def _track(client, start: int = 0) -> list[tuple]:
    job = client.submit(start, SIDE, api_name="/track")
    job.result(timeout=300)
    return job.outputs()


@pytest.mark.slow
def test_click_track_download_and_score(app, client, tmp_path: Path) -> None:
    seq = app.seqs[0]
    gt = app.root.read_gt(seq)
    n = len(gt)
    status = client.predict(seq, api_name="/load_sample")[0]
    assert f"{n} frames of 256x144" in status

    clicked, uploaded = _steady_objects(gt)[:2]

    # app object 1: one positive click in the middle of a ground-truth object
    x, y = _centre(gt[0] == clicked)
    frame_path, status, _ = client.predict(0, 1, "Positive", 0, SIDE, x, y, api_name="/click")
    assert "covers" in status and Path(frame_path).is_file()
    masks = _read_zip(client.predict(api_name="/download_masks")[0])
    assert sorted(masks) == [f"{i:05d}" for i in range(n)]
    assert _iou(masks["00000"] == 1, gt[0] == clicked) >= FLOOR_CLICK
    assert not any(masks[f"{i:05d}"].any() for i in range(1, n))

    # app object 2: a new object, another ground-truth object's mask uploaded as a binary PNG
    dd = client.predict(api_name="/new_object")[0]
    assert dd["value"] == 2
    write_mask(tmp_path / "obj2.png", (gt[0] == uploaded).astype(np.uint8))
    status = client.predict(0, 2, gradio_client.handle_file(str(tmp_path / "obj2.png")), api_name="/upload_mask")[1]
    assert "object 2" in status

    outputs = _track(client)
    overlays = [o[0] for o in outputs if isinstance(o[0], str)]
    # one live overlay per tracked frame; the last one is sent again with the final status, as the same file
    assert len(overlays) == n and overlays[-1] == overlays[-2] and len(set(overlays)) == n - 1
    fps_lines = [o[1] for o in outputs if isinstance(o[1], str) and "fps" in o[1]]
    # frames are numbered from 0 everywhere: the fps line names the last frame as the status does
    assert fps_lines and f"frame {n - 1} of 0–{n - 1}" in fps_lines[-1]
    assert outputs[-1][2].startswith(f"Done at frame {n - 1}")
    assert outputs[-1][3] == n - 1  # the slider followed the tracked frames

    masks = _read_zip(client.predict(api_name="/download_masks")[0])
    assert _mean_j(masks, gt, 2, range(1, n), uploaded) >= FLOOR_TRACK
    assert _mean_j(masks, gt, 1, range(1, n), clicked) >= FLOOR_TRACK

    video = client.predict(api_name="/download_video")[0]
    source = open_video(video)
    assert len(source) == n and source.size == (144, 256)


@pytest.mark.slow
def test_stop_then_correct_and_continue(app, client, tmp_path: Path) -> None:
    from densekit.serve.imageio import read_image

    seq = app.seqs[0]
    frames_paths = app.root.frame_paths(seq)
    gt = app.root.read_gt(seq)
    order = list(range(len(frames_paths))) + list(range(len(frames_paths) - 2, 0, -1))  # ping-pong: 18 frames
    folder = tmp_path / "pingpong"
    folder.mkdir()
    for k, i in enumerate(order):
        from PIL import Image

        Image.fromarray(read_image(frames_paths[i])).save(folder / f"{k:05d}.png")
    n = len(order)
    assert "18 frames" in client.predict(str(folder), api_name="/load_frames")[0]
    steady = _steady_objects(gt)
    assert len(steady) >= 2

    def truth(i: int) -> np.ndarray:  # the steady objects of ping-pong frame i
        return np.where(np.isin(gt[order[i]], steady), gt[order[i]], 0).astype(np.uint8)

    write_mask(tmp_path / "first.png", truth(0))
    assert (
        "objects"
        in client.predict(0, 1, gradio_client.handle_file(str(tmp_path / "first.png")), api_name="/upload_mask")[1]
    )

    job = client.submit(0, SIDE, api_name="/track")
    deadline = time.time() + 120
    while sum(isinstance(o[0], str) for o in job.outputs()) < 2 and time.time() < deadline and not job.done():
        time.sleep(0.05)
    client.predict(api_name="/stop")  # says nothing itself: the tracking run reports where it stopped
    assert "Nothing is being tracked" in _client(app, tmp_path / "other").predict(api_name="/stop")
    job.result(timeout=120)
    final = job.outputs()[-1]
    assert final[2].startswith("Stopped at frame ")
    k = int(final[2].split("frame ")[1].split(" ")[0])
    assert 1 <= k < n - 1
    assert final[3] == k  # the slider is where tracking stopped, the frame the last fps line named
    fps_lines = [o[1] for o in job.outputs() if isinstance(o[1], str) and "fps" in o[1]]
    assert f"frame {k} of 0–{n - 1}" in fps_lines[-1], (final[2], fps_lines[-1])
    # ... the viewer shows that frame's overlay (the last live picture), and the brush paints on that frame
    import cv2
    from PIL import Image

    shown_path = [o[0] for o in job.outputs() if isinstance(o[0], str)][-1]
    shown = np.asarray(Image.open(shown_path).convert("RGB"), dtype=np.int16)
    editor = client.predict(k, True, api_name="/brush_mode")[1]["value"]
    brush_bg = np.asarray(Image.open(editor["background"]).convert("RGB"), dtype=np.int16)
    first = read_image(app.root.frame_paths(seq)[0])
    first = cv2.resize(first, shown.shape[1::-1], interpolation=cv2.INTER_LINEAR).astype(np.int16)
    assert brush_bg.shape == shown.shape == first.shape
    # Lossy transport (webp) leaves a few levels of difference; frame 0 is far further away.
    assert np.abs(brush_bg - shown).mean() < 0.25 * np.abs(first - shown).mean()

    # correct frame k with its ground truth and continue from there
    write_mask(tmp_path / "fix.png", truth(k))
    client.predict(k, 1, gradio_client.handle_file(str(tmp_path / "fix.png")), api_name="/upload_mask")
    outputs = _track(client, start=k)
    assert outputs[-1][2].startswith(f"Done at frame {n - 1}")
    masks = _read_zip(client.predict(api_name="/download_masks")[0])
    assert len(masks) == n
    assert all(masks[f"{i:05d}"].any() for i in range(k, n))
    js = [_iou(masks[f"{i:05d}"] == o, truth(i) == o) for i in range(k + 1, n) for o in steady]
    assert np.mean(js) >= FLOOR_TRACK


def test_brush_and_clear(app, client, tmp_path: Path) -> None:
    from PIL import Image

    client.predict(app.seqs[1], api_name="/load_sample")
    assert client.predict(3, api_name="/show_frame")[2] == "Frame 3: no object."
    layer = np.zeros((144, 256, 4), np.uint8)
    layer[40:80, 60:120] = (255, 0, 0, 255)
    Image.fromarray(layer).save(tmp_path / "layer.png")
    Image.fromarray(np.zeros((144, 256, 3), np.uint8)).save(tmp_path / "bg.png")
    editor = {
        "background": gradio_client.handle_file(str(tmp_path / "bg.png")),
        "layers": [gradio_client.handle_file(str(tmp_path / "layer.png"))],
        "composite": gradio_client.handle_file(str(tmp_path / "bg.png")),
        "id": None,
    }
    status = client.predict(3, 1, editor, "Replace", api_name="/use_brush")[1]
    assert "covers 2400 pixels" in status
    erase = np.zeros_like(layer)
    erase[40:80, 60:90] = (255, 0, 0, 255)
    Image.fromarray(erase).save(tmp_path / "erase.png")
    editor["layers"] = [gradio_client.handle_file(str(tmp_path / "erase.png"))]
    client.predict(3, 1, editor, "Erase", api_name="/use_brush")
    assert client.predict(3, api_name="/show_frame")[2] == "Frame 3: objects 1."
    m = _read_zip(client.predict(api_name="/download_masks")[0])["00003"]
    expected = np.zeros((144, 256), bool)
    expected[40:80, 90:120] = True
    assert np.array_equal(m == 1, expected)

    # a negative click inside the brushed object removes part of it, not all of the frame's selection
    status = client.predict(3, 1, "Negative", 0, SIDE, 105.0, 60.0, api_name="/click")[1]
    after = _read_zip(client.predict(api_name="/download_masks")[0])["00003"] == 1
    assert not after[60, 105] and after.sum() < expected.sum(), status
    client.predict(3, 1, api_name="/clear_object")
    assert "Nothing to download" in client.predict(api_name="/download_masks")[1]


def test_bad_input_is_a_message_and_the_session_goes_on(app, client, tmp_path: Path) -> None:
    handle = gradio_client.handle_file
    assert "Load a video first." in client.predict(0, 1, "Positive", 0, SIDE, 5, 5, api_name="/click")[1]
    assert "Load a video first." in _track(client)[-1][2]
    assert "Load a video first." in client.predict(api_name="/download_masks")[1]
    assert "Load a video first." in client.predict(0, SIDE, api_name="/pca")[1]

    (tmp_path / "notes.txt").write_text("not a video")
    msg = client.predict(handle(str(tmp_path / "notes.txt")), api_name="/load_video")[0]
    assert "neither a folder of frames nor a video file" in msg and "notes.txt" in msg and "/tmp/gradio" not in msg
    (tmp_path / "fake.mp4").write_bytes(os.urandom(5000))
    assert "fake.mp4" in client.predict(handle(str(tmp_path / "fake.mp4")), api_name="/load_video")[0]

    from densekit.serve.imageio import write_overlay_video

    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (144, 256, 3), dtype=np.uint8) for _ in range(30)]
    write_overlay_video(tmp_path / "big.mp4", noise, [np.zeros((144, 256), np.uint8)] * 30, 10)
    assert (tmp_path / "big.mp4").stat().st_size > 0.2 * 2**20
    assert (
        "over this app's video size limit of 0.2 MB"
        in client.predict(handle(str(tmp_path / "big.mp4")), api_name="/load_video")[0]
    )
    write_overlay_video(tmp_path / "small.mp4", noise[:3], [np.zeros((144, 256), np.uint8)] * 3, 10)
    assert (
        "Loaded small.mp4: 3 frames" in client.predict(handle(str(tmp_path / "small.mp4")), api_name="/load_video")[0]
    )
    # a path typed on the server is named in full, as a folder or a video file
    msg = client.predict(str(tmp_path / "nowhere"), api_name="/load_frames")[0]
    assert f"No folder or video file at {tmp_path / 'nowhere'}" in msg, msg

    client.predict(app.seqs[0], api_name="/load_sample")
    assert "has no object" in _track(client)[-1][2]
    assert "covers nothing" in client.predict(0, 1, "Negative", 0, SIDE, 5, 5, api_name="/click")[1]
    editor = {"background": None, "layers": [], "composite": None, "id": None}
    assert "drawing is empty" in client.predict(0, 1, editor, "Add", api_name="/use_brush")[1]
    write_mask(tmp_path / "empty.png", np.zeros((144, 256), np.uint8))
    assert "covers nothing" in client.predict(0, 1, handle(str(tmp_path / "empty.png")), api_name="/upload_mask")[1]
    write_mask(tmp_path / "square.png", np.ones((100, 100), np.uint8))
    assert (
        "100x100 but the video is 256x144"
        in client.predict(0, 1, handle(str(tmp_path / "square.png")), api_name="/upload_mask")[1]
    )
    assert "outside the 256x144 frame" in client.predict(0, 1, "Positive", 0, SIDE, 300, 5, api_name="/click")[1]

    gt = app.root.first_mask(app.seqs[0])
    x, y = _centre(gt == 1)
    assert "covers" in client.predict(0, 1, "Positive", 0, SIDE, x, y, api_name="/click")[1]  # still working


def test_no_event_but_the_users_writes_a_session(app) -> None:
    """A session is made when it is first used, never by an event of its own: a page-load event that sets the
    state (what gr.State(callable) adds) can land after a fast user's first load and put an empty session in
    its place, so that the next click says "Load a video first." (seen in the browser test under load)."""
    import copy

    import gradio as gr

    from densekit.apps.app import TrackSession

    states = {b._id for b in app.demo.blocks.values() if isinstance(b, gr.State)}
    assert len(states) == 2  # the Track and the Webcam sessions
    writers = [d for d in app.demo.config["dependencies"] if states & set(d["outputs"])]
    assert not writers, [(d.get("api_name"), d["targets"]) for d in writers]
    first = TrackSession()
    first.objects.append(3)
    fresh = copy.deepcopy(first)  # what each browser session is given
    assert fresh is not first and fresh.objects == [] and fresh.video is None


@pytest.mark.slow
def test_two_sessions_do_not_mix(app, tmp_path: Path) -> None:
    clients = [_client(app, tmp_path / f"c{i}") for i in range(3)]
    gts = [app.root.read_gt(s) for s in app.seqs]
    start = 6
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            c = clients[i]
            c.predict(app.seqs[i], api_name="/load_sample")
            if i == 0:
                write_mask(tmp_path / f"m{i}.png", gts[i][start])
                c.predict(start, 1, gradio_client.handle_file(str(tmp_path / f"m{i}.png")), api_name="/upload_mask")
            else:  # the bundled sample's own annotation of that frame
                assert "the sample's annotation" in c.predict(start, api_name="/sample_annotation")[1]
            _track(c, start)
            results[i] = _read_zip(c.predict(api_name="/download_masks")[0])
        except BaseException as exc:  # reported by the main thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    # a third session sees nothing of theirs
    third = clients[2]
    assert "Load a video first." in third.predict(0, 1, "Positive", 0, SIDE, 5, 5, api_name="/click")[1]
    for t in threads:
        t.join(timeout=300)
    n = len(gts[0])
    for i in range(2):
        masks = results[i]
        assert isinstance(masks, dict), masks
        assert not any(masks[f"{j:05d}"].any() for j in range(start))
        own = [_iou(masks[f"{j:05d}"] > 0, gts[i][j] > 0) for j in range(start, n)]
        other = [_iou(masks[f"{j:05d}"] > 0, gts[1 - i][j] > 0) for j in range(start, n)]
        assert own[0] == 1.0  # the uploaded mask, untouched by the other session
        assert np.mean(own) >= FLOOR_TRACK and np.mean(own) > np.mean(other) + 0.3, (i, own, other)


def test_pca_and_search(app, client, tmp_path: Path) -> None:
    from PIL import Image

    from densekit.serve.imageio import read_image

    client.predict(app.seqs[0], api_name="/load_sample")
    pca = np.asarray(Image.open(client.predict(2, SIDE, api_name="/pca")[0]).convert("RGB"))
    assert pca.shape == (144, 256, 3) and pca.std() > 10
    other = np.asarray(Image.open(client.predict(7, SIDE, api_name="/pca_frame")[0]).convert("RGB"))
    assert other.shape == pca.shape and not np.array_equal(other, pca)

    assert "No index" in client.predict("", None, 5, 1, 1, api_name="/search")[2]
    images = tmp_path / "images"
    images.mkdir()
    for seq in app.seqs:
        for i in (0, 5, 9):
            Image.fromarray(read_image(app.root.frame_paths(seq)[i])).save(images / f"{seq}-{i}.png")
    index_dir, status = client.predict(str(tmp_path / "index"), str(images), api_name="/build_index")
    assert "added 6 images" in status and Path(index_dir, "meta.sqlite").is_file()

    query = images / f"{app.seqs[0]}-5.png"
    gt = read_mask(app.root.annotation_paths(app.seqs[0])[5])
    x, y = _centre(gt == gt[gt > 0].min())
    gallery, query_pic, status = client.predict(
        index_dir, gradio_client.handle_file(str(query)), 5, x, y, False, api_name="/search"
    )
    assert len(gallery) == 5 and "5 nearest segments" in status and Path(query_pic).is_file()
    captions = [g["caption"] for g in gallery]
    scores = [float(c.split("score ")[1].split(" ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    # the query image is indexed: with it kept in, its own segment under the point comes first
    assert query.name in captions[0] and scores[0] > 0.85
    # by default it is left out (issue 16: the query's own image was its three best hits)
    gallery = client.predict(index_dir, gradio_client.handle_file(str(query)), 5, x, y, api_name="/search")[0]
    assert len(gallery) == 5 and all(query.name not in g["caption"] for g in gallery)
    assert (
        "no segment index"
        in client.predict(
            str(tmp_path / "nothing"), gradio_client.handle_file(str(query)), 5, x, y, api_name="/search"
        )[2]
    )


def test_webcam_step_and_tracking_loop(app, client) -> None:
    import cv2

    from densekit.apps.app import WebcamSession, tracking_loop, webcam_step
    from densekit.serve.imageio import read_image

    assert "No webcam frame yet" in client.predict(api_name="/webcam_capture")[1]
    assert "Capture a frame" in client.predict(SIDE, api_name="/webcam_track")
    assert "Capture a webcam frame first" in client.predict("Positive", 1, SIDE, 10, 10, api_name="/webcam_click")[1]
    assert client.predict(api_name="/webcam_new_object")[0]["value"] == 2
    assert "stopped" in client.predict(api_name="/webcam_stop")

    seq = app.seqs[0]
    frames = [read_image(p) for p in app.root.frame_paths(seq)]
    gt = app.root.read_gt(seq)
    ws = WebcamSession()
    assert "allow camera access" in webcam_step(ws, None).status
    live = webcam_step(ws, frames[0])
    assert live.mask is None and np.array_equal(live.display, frames[0]) and "Capture" in live.status
    ws.capture()
    target = _steady_objects(gt)[0]
    x, y = _centre(gt[0] == target)
    assert "covers" in ws.click(app.engine, 1, x, y, short_side=SIDE)
    ws.start(app.engine, SIDE)
    r = webcam_step(ws, frames[1])
    assert r.mask is not None and r.latency_ms > 0 and r.display.shape == frames[1].shape
    assert _iou(r.mask == 1, gt[1] == target) >= FLOOR_CLICK
    smaller = webcam_step(ws, cv2.resize(frames[2], (128, 72), interpolation=cv2.INTER_AREA))
    assert smaller.mask.shape == (144, 256)  # frames of another size are fitted to the captured one
    with ws.lock:  # a frame arriving while one is being processed is dropped
        assert webcam_step(ws, frames[3]).dropped

    # the per-frame loop the benchmark times: same propagator code path as the page
    from densekit.retrieval.propagation import preset

    updates = list(tracking_loop(app.engine.extractor, frames[:4], gt[0], preset(app.engine.preset, short_side=SIDE)))
    assert [u.index for u in updates] == [1, 2, 3]
    assert all(u.display is not None and u.step_seconds > 0 for u in updates)
    assert _iou(updates[0].mask > 0, gt[1] > 0) >= FLOOR_TRACK


def test_cli_help_is_light_and_bad_index_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from densekit.apps.cli import main\n"
        "rc = main(['app', '--help'])\n"
        "heavy = [m for m in ('torch', 'timm', 'cv2', 'skimage', 'matplotlib', 'gradio') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, (rc, heavy)\n"
        f"rc = main(['app', '--index', {str(tmp_path / 'missing')!r}])\n"
        "assert rc == 2, rc\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--max-video-mb" in out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith("error: --index")


def test_a_picture_sent_again_is_not_rewritten_under_the_browser(tmp_path: Path) -> None:
    """Gradio 6 rewrites an array output's cache file each time the same picture is sent; a browser still
    fetching the first copy then gets a broken image (CI: 'Too much data for declared Content-Length'). The
    app's images write each picture once, atomically, and serve what is there."""
    from PIL import Image

    from densekit.apps.app.atomic_image import AtomicImage

    picture = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img = AtomicImage(format="jpeg", interactive=False)
    first = Path(img.postprocess(picture).path)
    assert Image.open(first).size == (64, 48)
    os.utime(first, (1_000_000, 1_000_000))  # a write would move the modification time
    data = first.read_bytes()
    again = Path(img.postprocess(picture.copy()).path)
    assert again == first and first.stat().st_mtime == 1_000_000 and first.read_bytes() == data  # not rewritten
    other = Path(img.postprocess(255 - picture).path)
    assert other != first and Image.open(other).size == (64, 48)
    assert not [p for p in first.parent.iterdir() if p.name != first.name]  # no temporary file left behind
