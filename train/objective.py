"""The base class every dense self-supervised objective implements: the contract between objectives and trainer.

An :class:`Objective` is one small ``nn.Module`` that owns the student backbone plus the loss's heads and any
training state (EMA teacher, queues, pointers). The trainer knows nothing about a method beyond this interface,
in the spirit of lightly's loss/head modules and solo-learn's ``BaseMethod``:

* :meth:`Objective.transform` returns a picklable callable that runs in DataLoader workers on CPU and turns raw
  frames into one sample's fixed-shape arrays (views normalised with ``backbone.meta`` mean/std, flow, crops...).
* :meth:`Objective.forward` turns a collated batch into ``{"loss": scalar, other scalars to log}``.
* :meth:`Objective.before_optimizer_step` runs after ``backward`` (gradients unscaled under AMP) and before gradient
  clipping and the optimiser step: DINO's ``freeze_last_layer``
  (:func:`densekit.train.heads.cancel_last_layer_grads`), any gradient surgery.
* :meth:`Objective.on_step_end` runs after each optimiser step (EMA momentum update, queue push, ...).
* :meth:`Objective.export_backbone` is what gets exported to ``backbone.safetensors`` and evaluated during
  training: the student (:meth:`Objective.student_backbone`) by default; methods that evaluate their EMA teacher
  (CrIBo, SelfPatch, DINO) return the teacher.

EMA teachers are made with :func:`make_teacher` (frozen, no stochastic depth); :meth:`Objective.train` keeps them in
eval mode when the trainer calls ``model.train()``.

Rules for exact resume and DDP equivalence:

* All state lives in parameters/buffers so ``state_dict()`` captures it; EMA teacher params have
  ``requires_grad=False``.
* Anything spanning the global batch (negatives, batch statistics) goes through
  :func:`densekit.train.dist.gather_with_grad` / :func:`densekit.train.dist.all_reduce_mean` /
  :func:`densekit.train.dist.concat_all_gather`, so 2 DDP processes give the same gradients as 1 process on the
  same global batch.
* No global RNG use inside ``forward`` except torch's (the trainer saves and restores torch, numpy and python RNG
  states). Augmentation randomness comes only from the ``np.random.Generator`` handed to the transform.
* Every random choice of the method is drawn in the transform, from the sample's generator, and travels in the
  batch as data: crops and flips, and also what official code draws with torch's RNG inside ``forward`` - cluster
  initialisation indices (CrIBo's Sinkhorn centroids), patch and position masks (DropPos), sampled mask ids
  (DetCon), dropped tokens (packing). The generator is seeded by (seed, global sample index), so the draws are a
  pure function of the data position: the same on 1 or N processes and after a resume. (The torch RNG in
  ``forward`` is per rank, so draws made there differ between 1 and N processes.)
* Counts that vary per image (valid clusters, dropped-position tokens) are normalised over the global batch
  (:func:`densekit.train.dist.global_mean`); variable-size state lives in fixed shapes with a validity mask
  (:class:`densekit.train.dist.MaskedQueue`), so ``concat_all_gather`` applies.
* Losses that overflow or underflow in fp16/bf16 (large softmaxes, Sinkhorn's exponentials, centring) run inside
  :func:`densekit.train.losses.fp32` on ``.float()`` inputs: the trainer's forward runs under autocast on CUDA.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from densekit.serve.backbones import DenseBackbone

#: A transform: (raw frames, generator) -> dict of fixed-shape numpy arrays for ONE sample.
Transform = Callable[[list[np.ndarray], np.random.Generator], dict[str, np.ndarray]]

#: The two kinds of data an objective can ask for.
DATA_KINDS = ("pairs", "images")

#: attribute :func:`make_teacher` sets on a teacher module; :meth:`Objective.train` keeps such modules in eval mode
TEACHER_FLAG = "_densekit_teacher"

M = TypeVar("M", bound=nn.Module)


def _stochastic_depth_types() -> tuple[type, ...]:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    return (DropPath, StochasticDepth)


def make_teacher(module: M) -> M:
    """An EMA teacher from a student module: a deep copy, frozen (``requires_grad=False``), in eval mode, without
    stochastic depth (timm ``DropPath`` and torchvision ``StochasticDepth`` replaced by ``nn.Identity``, as DINO,
    CrIBo and SelfPatch build their teacher without ``drop_path_rate``), and marked so that
    :meth:`Objective.train` keeps it in eval mode (dropout and BatchNorm statistic updates off). Parameter and
    buffer names are those of the student, so an EMA update can zip ``parameters()``.
    """
    teacher = copy.deepcopy(module)
    drop_types = _stochastic_depth_types()
    for parent in list(teacher.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, drop_types):
                setattr(parent, name, nn.Identity())
    if isinstance(teacher, drop_types):
        teacher = nn.Identity()  # type: ignore[assignment]
    for p in teacher.parameters():
        p.requires_grad_(False)
    setattr(teacher, TEACHER_FLAG, True)
    return teacher.eval()


O = TypeVar("O", bound="Objective")


class Objective(nn.Module):
    """Base class of a dense self-supervised objective (loss + heads + training state).

    Class attributes:
        name: registry name, e.g. ``"poodle"``, ``"densecl"``.
        data: ``"pairs"`` (two frames of one video, gap in ``[gap_min, gap_max]``) or ``"images"`` (one image;
            frames of videos count as images).

    Subclasses call ``super().__init__()`` then store the backbone (as ``self.backbone`` by convention) and build
    their heads; hyper-parameters are keyword arguments whose defaults are the paper's values.
    """

    name: ClassVar[str] = ""
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, **hparams: Any) -> None:
        """Args:
            backbone: the student ``DenseBackbone``; forward (B,3,H,W) normalised -> (B,D,H/s,W/s).
            **hparams: method hyper-parameters (defaults = the paper's).
        """
        super().__init__()
        self.backbone = backbone
        self.hparams: dict[str, Any] = dict(hparams)

    def transform(self) -> Transform:
        """Return a picklable callable run in DataLoader workers (CPU).

        The callable gets the raw frames (list of (H,W,3) uint8 RGB: length 1 for ``"images"``, 2 for ``"pairs"``
        ``[frame t, frame t+d]``) and a ``np.random.Generator`` seeded by the trainer per (seed, sample index),
        and returns a dict of fixed-shape float32/int arrays for ONE sample (e.g. ``"view1"`` (3,H,W) float32
        normalised with ``backbone.meta.mean/std``). The default collate stacks them into tensors (B, ...).
        It must not capture the model (it is pickled into workers): capture plain numbers/arrays only.
        """
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Compute the loss on one (local) batch.

        Args:
            batch: the collated transform outputs, each (B, ...) on the training device.
        Returns:
            ``{"loss": scalar tensor, <name>: scalar tensor to log, ...}``.
        """
        raise NotImplementedError

    def collate(self) -> Callable[[list[dict[str, np.ndarray]]], dict[str, Any]] | None:
        """A picklable callable that turns the step's list of samples into the batch, or None (default: torch's
        default collate, which stacks the fixed-shape arrays). Packing objectives return a
        :class:`densekit.train.packing.PackCollate`; a batch that holds ``"num_images"`` is counted by it.
        """
        return None

    def check_dataset(self, num_samples: int) -> None:
        """Called once the training data is known, before the first step: raise
        :class:`~densekit.serve.errors.DensekitError` when the objective cannot train on ``num_samples`` samples
        (e.g. a memory bank of past images larger than the data). Default: nothing."""

    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        """Hook between ``backward`` and the optimiser step: gradients are there (unscaled under AMP), clipping
        (``optim.grad_clip``) and the step come after. Setting a parameter's ``.grad`` to None makes the optimiser
        skip it (DINO's ``freeze_last_layer``: :func:`densekit.train.heads.cancel_last_layer_grads`). Default:
        nothing.

        Args:
            step: the step being taken, 0-based.
            max_steps: total number of steps of the run.
        """

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Hook after each optimiser step (EMA teacher momentum update, queue push...). Default: nothing.

        Args:
            step: the step that just finished, 0-based.
            max_steps: total number of steps of the run (for momentum/temperature schedules).
        """

    def student_backbone(self) -> DenseBackbone:
        """The student backbone (``self.backbone`` by default). What gets exported is :meth:`export_backbone`."""
        return self.backbone

    def export_backbone(self) -> DenseBackbone:
        """The backbone the trainer exports (``RUN_DIR/backbone.safetensors``) and evaluates during training.
        Default: :meth:`student_backbone`; an objective whose paper evaluates the EMA teacher returns it here."""
        return self.student_backbone()

    def teacher_modules(self) -> list[nn.Module]:
        """Modules :meth:`train` keeps in eval mode: by default every submodule made by :func:`make_teacher`."""
        return [m for m in self.modules() if m is not self and getattr(m, TEACHER_FLAG, False)]

    def train(self: "O", mode: bool = True) -> "O":
        """``nn.Module.train``, except that :meth:`teacher_modules` and the stages ``finetune.freeze_until`` froze
        stay in eval mode (the trainer calls ``model.train()`` on the whole objective; a teacher or a frozen stage
        must not drop paths or update BatchNorm statistics)."""
        from densekit.train.finetune import frozen_modules

        super().train(mode)
        for m in self.teacher_modules() + frozen_modules(self):
            m.eval()
        return self
