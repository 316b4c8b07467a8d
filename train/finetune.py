"""Fine-tuning a pretrained start: frozen early stages and a smaller learning rate for the backbone.

An engineer with their own footage first tries to improve the pretrained model they already have (issue 13);
the two settings fine-tuning recipes use for that (e.g. detectron2's ``FREEZE_AT``, timm's layer-wise learning
rate; BYOL/DINO fine-tuning) are config keys of the ``finetune`` section:

* ``finetune.freeze_until: STAGE`` (a name of the backbone's ``stage_info``: ``layer2``, ``blocks.3``...): that
  stage, every stage before it and the stem get no gradient and no weight decay, and their BatchNorm and
  dropout stay in eval mode (a frozen stage keeps the statistics it was pretrained with, not those of a
  small batch of one user's video);
* ``finetune.backbone_lr_mult: M``: the backbone's parameters train at ``M x`` the schedule's learning rate,
  the objective's heads at the full rate (new heads on a pretrained body need a larger step than the body).

Both are checked before any training step: an unknown stage names the ones there are, and a freeze that leaves
no stage of the backbone to train is refused (the exported backbone would be the start).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from densekit.serve.errors import DensekitError

#: attribute set on modules that :func:`freeze_until` froze; :meth:`Objective.train` keeps them in eval mode
FROZEN_FLAG = "_densekit_frozen"


def trainable_prefixes(backbone: nn.Module, stage: str) -> list[str]:
    """Module-name prefixes (inside ``backbone``) of the stages after ``stage``: what stays trainable."""
    infos = backbone.stage_info
    names = [info.name for info in infos]
    if stage not in names:
        raise DensekitError(f"finetune.freeze_until={stage!r}: the backbone has no such stage (its stages: "
                            f"{', '.join(names)})")
    later = names[names.index(stage) + 1:]
    if not later:
        raise DensekitError(f"finetune.freeze_until={stage!r} freezes every stage of the backbone: nothing of it "
                            f"would train (freeze at most {names[-2] if len(names) > 1 else 'no stage'})")
    return [f"body.{name}" for name in later]


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_until(backbone: nn.Module, stage: str) -> int:
    """Freeze ``backbone`` up to and including ``stage`` (and everything before the first stage); returns the
    number of parameters frozen. Frozen leaf modules get :data:`FROZEN_FLAG`."""
    keep = trainable_prefixes(backbone, stage)
    frozen = 0
    for name, p in backbone.named_parameters():
        if not _under(name, keep):
            p.requires_grad_(False)
            frozen += p.numel()
    for name, m in backbone.named_modules():
        if name and not any(True for _ in m.children()) and not _under(name, keep):
            setattr(m, FROZEN_FLAG, True)
    return frozen


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`freeze_until` marked, anywhere in ``model``."""
    return [m for m in model.modules() if getattr(m, FROZEN_FLAG, False)]


def backbone_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter of the objective's student backbone (what ``backbone_lr_mult`` scales)."""
    backbone = model.student_backbone() if hasattr(model, "student_backbone") else model
    return {id(p) for p in backbone.parameters()}


def check_lr_mult(mult: float) -> None:
    if not (mult > 0 and mult <= 1e3 and torch.isfinite(torch.tensor(mult))):
        raise DensekitError(f"finetune.backbone_lr_mult must be a positive number, got {mult}")
