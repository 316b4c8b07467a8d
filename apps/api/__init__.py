"""densekit: dense self-supervised vision backbones, from training to production.

The public Python API, one import away::

    from densekit import FeatureExtractor, MaskPropagator, SegmentIndex, load_backbone, score_davis, evaluate_davis

Each name is loaded when first used (a module ``__getattr__``, PEP 562), so ``import densekit`` stays as
light as the command line's ``--help``: no torch, OpenCV or FAISS until a name that needs them is asked for.
The areas behind them stay importable as ``densekit.serve``, ``densekit.retrieval``, ``densekit.train``,
``densekit.export`` and ``densekit.apps``.

(This file is the ``densekit`` package itself: pyproject.toml maps ``densekit`` to ``apps/api/``, inside the
top floor, because it imports from every area below and no area may import it.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from densekit.serve.contract import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "FeatureExtractor": "densekit.serve.extractor",
    "load_backbone": "densekit.serve.loader",
    "make_sample": "densekit.serve.sample",
    "DavisRoot": "densekit.serve.davis",
    "read_image": "densekit.serve.imageio",
    "PropagationConfig": "densekit.retrieval.propagation",
    "RegionQuery": "densekit.retrieval.segment_index",
    "MaskPropagator": "densekit.retrieval.propagation",
    "SegmentIndex": "densekit.retrieval.segment_index",
    "evaluate_davis": "densekit.retrieval.davis_eval",
    "score_davis": "densekit.retrieval.davis_protocol",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'densekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from densekit.retrieval.davis_eval import evaluate_davis
    from densekit.retrieval.davis_protocol import score_davis
    from densekit.retrieval.propagation import MaskPropagator, PropagationConfig
    from densekit.retrieval.segment_index import RegionQuery, SegmentIndex
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_image
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.loader import load_backbone
    from densekit.serve.sample import make_sample
