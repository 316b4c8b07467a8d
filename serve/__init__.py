"""densekit.serve: the ground floor.

The model contract (:mod:`densekit.serve.contract`), image and video I/O, the DAVIS layout, the sample
data generator and the feature extractor. Importing this package never imports torch; the torch parts
(:mod:`densekit.serve.backbones`, :mod:`densekit.serve.checkpoint`) are imported on demand.
"""

from densekit.serve.contract import ModelMeta, __version__
from densekit.serve.errors import DensekitError

__all__ = ["DensekitError", "ModelMeta", "__version__"]
