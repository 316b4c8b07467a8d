"""``gr.Image`` whose picture outputs reach the page whole, however often the same picture is sent.

Gradio 6 saves an array output to ``cache/<hash of the encoded bytes>/image.<format>`` with a plain
``write_bytes`` every time it is sent. When the app sends a picture it has sent before (the last tracked
frame shown again when tracking ends, an unchanged overlay) while the browser is still fetching the first
copy, the server streams a file that is being rewritten ("Too much data for declared Content-Length") and the
page shows a broken image: seen in CI's browser test under load. :class:`AtomicImage` writes the encoded
picture once, atomically (:func:`densekit.serve.atomic.write_bytes_atomic`), and hands Gradio the path, which
Gradio serves as it is.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from densekit.serve.atomic import write_bytes_atomic


class AtomicImage(gr.Image):
    """``gr.Image`` (same arguments) whose numpy outputs are cached atomically and never rewritten."""

    def get_block_name(self) -> str:
        return "image"  # the page draws it with gr.Image's own frontend (the documented override)

    def postprocess(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            value = self.cache_array(value)
        return super().postprocess(value)

    def cache_array(self, image: np.ndarray) -> str:
        """Encode ``image`` ((H, W[, C]) uint8) in the component's format into the Gradio cache, once; its path."""
        from PIL import Image

        fmt = (self.format or "png").lower()
        pil_format = {"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper())
        arr = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr)
        if pil_format == "JPEG" and pil.mode not in ("RGB", "L"):
            pil = pil.convert("RGB")
        buf = io.BytesIO()
        pil.save(buf, format=pil_format)
        data = buf.getvalue()
        path = Path(self.GRADIO_CACHE) / f"densekit-{hashlib.sha256(data).hexdigest()}" / f"image.{fmt}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data)
        return str(path)
