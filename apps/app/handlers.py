"""What every tab's event handlers share: one error-reporting decorator and the small conversions of page values.

A tab is a class whose handlers are methods returning ``{component: value}`` dicts, and whose ``status``
attribute is the Markdown line it reports in. :func:`reports_errors` turns any exception of a handler into a
warning toast plus that status line, so handlers are written for the good path only. Gradio is imported
inside the functions: this module is imported by the tabs, which need it anyway, but costs nothing else.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, TypeVar

import numpy as np

from densekit.apps.app.display import object_label
from densekit.serve.errors import DensekitError, one_line

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Any])


def warning(exc: BaseException) -> str:
    """The status line for a failed handler (and a ``gr.Warning`` toast with the same words).

    A DensekitError is the user's to fix and says how in one line. Anything else is a bug: it must not end
    the session, so the page says so in one line too and the traceback goes to the log.
    """
    import gradio as gr

    if isinstance(exc, DensekitError):
        msg = one_line(exc)
    else:
        log.error("app handler failed", exc_info=exc)
        msg = f"Internal error ({type(exc).__name__}): {one_line(exc)}"
    gr.Warning(msg)
    return f"⚠️ {msg}"


def reports_errors(handler: Handler) -> Handler:
    """Decorate a tab's handler method: an exception becomes ``{self.status: warning(exc)}``.

    Streaming handlers (generator functions) yield that dict and end. ``functools.wraps`` keeps the
    handler's signature and annotations visible, which Gradio reads to inject ``gr.SelectData`` and
    ``gr.Progress`` arguments and to document the endpoint. Cancelling (GeneratorExit) is not caught.
    """
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(self: Any, *args: Any, **kwargs: Any) -> Iterator[dict]:
            try:
                yield from handler(self, *args, **kwargs)
            except Exception as exc:
                yield {self.status: warning(exc)}

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return handler(self, *args, **kwargs)
        except Exception as exc:
            return {self.status: warning(exc)}

    return call  # type: ignore[return-value]


def short_side_value(value: Any) -> Optional[int]:
    """A processing-size dropdown value: 0 or empty means automatic (None)."""
    try:
        return int(value) or None if value not in (None, "") else None
    except (TypeError, ValueError):
        raise DensekitError(f"processing size must be a number, got {value!r}") from None


def threshold_value(value: Any) -> Optional[float]:
    """The similarity-threshold slider: 0 (or empty) means Otsu's automatic threshold (None)."""
    try:
        t = float(value or 0)
    except (TypeError, ValueError):
        raise DensekitError(f"threshold must be a number, got {value!r}") from None
    return t if t > 0 else None


def object_choices(objects: Sequence[int], value: int) -> Any:
    """The update of an object dropdown: every object by its label, ``value`` selected."""
    import gradio as gr

    return gr.update(choices=[(object_label(o), o) for o in sorted(objects)], value=value)


def editor_value(image: np.ndarray) -> dict[str, Any]:
    """A ``gr.ImageEditor`` value showing ``image`` with nothing painted on it."""
    return {"background": image, "layers": [], "composite": image}
