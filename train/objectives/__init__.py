"""The dense self-supervised objectives, by registry name (``densekit train --objective NAME``).

Each is a :class:`densekit.train.objective.Objective` (loss + heads + training state, one ``nn.Module``).
"""

from __future__ import annotations

from densekit.train.objectives.cribo import CrIBo
from densekit.train.objectives.densecl import DenseCL
from densekit.train.objectives.detcon import DetCon
from densekit.train.objectives.droppos import DropPos
from densekit.train.objectives.hiergroup import HierGroupContrast
from densekit.train.objectives.poodle import PooDLe
from densekit.train.objectives.selfpatch import SelfPatch
from densekit.train.objectives.vicregl import VICRegL

OBJECTIVES = {"poodle": PooDLe, "densecl": DenseCL, "vicregl": VICRegL, "hiergroup": HierGroupContrast}
OBJECTIVES["detcon"] = DetCon
OBJECTIVES["droppos"] = DropPos
OBJECTIVES["cribo"] = CrIBo
OBJECTIVES["selfpatch"] = SelfPatch

__all__ = ["OBJECTIVES", "CrIBo", "DenseCL", "DetCon", "DropPos", "HierGroupContrast", "PooDLe", "SelfPatch", "VICRegL"]
