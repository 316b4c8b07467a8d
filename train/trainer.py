"""The training loop: one process or DDP via torchrun, exact resume, safetensors+JSON state, J&F eval hook.

A run directory holds:

* ``config.yaml``: the full resolved :class:`~densekit.train.config.TrainConfig` (objective hparams included);
* ``state.safetensors``: the full training state, written atomically every ``save_every`` steps. Tensors
  (objective ``state_dict()`` - student, heads, EMA teacher, queues, pointers -, optimiser moments, torch/CUDA
  RNG states of every rank) are safetensors tensors; everything else (step, optimiser hyper-parameters, grad
  scaler, numpy and python RNG states, the config) is JSON in the file's metadata. Nothing is pickled, so a
  state file can be inspected and loaded without executing code; its metadata also holds the SHA-256 of its contents
  (:func:`densekit.serve.checkpoint.write_with_digest`), so ``--resume`` refuses a corrupt state. The learning rate is a pure function of the
  step (linear warm-up, then cosine), so the step IS the scheduler state; the step is also the data position
  (:mod:`densekit.train.data`).
* ``backbone.safetensors``: the student backbone via :func:`densekit.serve.checkpoint.save_checkpoint`, with
  ``meta.objective`` set - loadable by every other command.
* ``log.jsonl`` (one JSON line per logged step / evaluation; a resumed run first drops the records past its state's
  step, which it redoes, so each step is there once) and ``tb/`` (TensorBoard scalars). Temporary files that a run
  killed mid-write left behind are removed when the next one starts.

Exact resume: on CPU with ``deterministic=true``, a run interrupted at any point and resumed from its last
state ends with bit-identical weights to an uninterrupted run: everything random is either restored (torch,
numpy, python RNGs per rank) or a pure function of (seed, step) (data order, crops, augmentations; the
DataLoader gets its own generator so creating it never consumes the global RNG).

Time budget: with ``budget_s`` > 0 the trainer times :data:`~densekit.train.budget.CALIBRATION_STEPS` steps on the
``clock`` (``wall`` or ``cpu``, see :mod:`densekit.train.budget`; the time counts from the start of ``fit``, model
building included), puts model, optimiser and RNGs back, and sets the schedule length (``max_steps`` is then an
upper bound) so that the cosine ends with the budget; at 10 % and 50 % of the budget it re-sizes the schedule from
the loop's own rate (:class:`~densekit.train.budget.Replan`: a calibration taken while the machine was busy, or in
a cold process, can be several times off); it stops after the first step that finds the budget spent,
then saves and exports as a finished run. The schedule length and the time spent are in the state file, so a
resumed budget run keeps its schedule (exact resume) and its remaining time. ``log.jsonl`` gets a ``budget``
record (calibration), a ``replan`` record per re-sizing, and every run an ``end`` record (clock, seconds, whether the budget stopped it).

DDP: ``torchrun --nproc_per_node N densekit train ...`` (or any launcher setting RANK/WORLD_SIZE/MASTER_ADDR);
gloo on CPU, nccl on CUDA. ``batch_size`` is the global batch; rank r gets samples
``[s*B + r*B/N, s*B + (r+1)*B/N)`` at step s. DDP averages gradients over ranks; objectives gather negatives and
statistics with :mod:`densekit.train.dist`, so N processes reproduce the single-process gradients. BatchNorm
statistics stay per process (as in MoCo/DenseCL without SyncBN); ``ddp.sync_bn`` (CUDA) changes that.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.errors import DensekitError, one_line
from densekit.train import dist
from densekit.train.budget import CALIBRATION_STEPS, Budget, Replan, StepTimer
from densekit.train.config import RESUMABLE_CHANGES, TrainConfig, dump_yaml, flat, from_dict, to_dict
from densekit.train.objective import Objective

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
STATE_META_KEY = "densekit_train_state"
STATE_FORMAT = 1

Hook = Callable[["Trainer", int], None]
Evaluator = Callable[[nn.Module, Any, str], dict[str, float]]


# ----------------------------------------------------------------------------------------------------
# Objective lookup
# ----------------------------------------------------------------------------------------------------


def available_objectives() -> dict[str, type[Objective]]:
    """``densekit.train.objectives.OBJECTIVES`` (empty when that package is not there yet)."""
    try:
        import densekit.train.objectives as package
    except ModuleNotFoundError as exc:
        if exc.name == "densekit.train.objectives":
            return {}
        raise
    return dict(getattr(package, "OBJECTIVES", {}))


def get_objective_class(name: str) -> type[Objective]:
    """An objective class by registry name, or ``package.module:ClassName`` for your own objective."""
    if ":" in name:
        import importlib

        mod_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise DensekitError(f"cannot import objective {name!r}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise DensekitError(f"{name!r} is not a densekit.train.objective.Objective subclass")
        return cls
    table = available_objectives()
    if name not in table:
        known = ", ".join(sorted(table)) or "none installed"
        raise DensekitError(f"unknown objective {name!r}; choose one of: {known} (or module:Class)")
    return table[name]


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def resolve_hparams(cls: type[Objective], given: dict[str, Any]) -> dict[str, Any]:
    """The objective's keyword defaults (from ``__init__``'s signature) updated with ``given``.

    Raises:
        DensekitError: a key the objective does not take (lists the ones it does).
    """
    sig = inspect.signature(cls.__init__)
    params = list(sig.parameters.values())[2:]  # self, backbone
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(given) - set(named))
    if unknown and not takes_kwargs:
        raise DensekitError(
            f"objective {cls.name or cls.__name__} has no hyper-parameter(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(named) or 'none'}"
        )
    out = {k: _jsonable(p.default) for k, p in named.items() if p.default is not inspect.Parameter.empty}
    out.update(given)
    return out


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


def warmup_steps(cfg: TrainConfig, max_steps: int | None = None) -> int:
    """Warm-up length: ``optim.warmup_steps`` or, when negative, 5% of the schedule length."""
    w = cfg.optim.warmup_steps
    return int(round(0.05 * (max_steps or cfg.max_steps))) if w < 0 else int(w)


def weight_decay_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Weight decay of step ``step``: ``optim.weight_decay``, or with ``optim.weight_decay_end`` set a half-cosine
    from ``weight_decay`` (step 0) to ``weight_decay_end`` (end of the schedule), DINO's ``cosine_scheduler`` for
    weight decay (0.04 -> 0.4 in DINO, CrIBo, SelfPatch); a pure function of the step like :func:`lr_at`."""
    o = cfg.optim
    if o.weight_decay_end is None:
        return o.weight_decay
    t = min(1.0, step / max(1, max_steps or cfg.max_steps))
    return o.weight_decay_end + (o.weight_decay - o.weight_decay_end) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip gradients in place -> the global L2 norm of all gradients before clipping (for the log).

    ``global``: one scale for all (``torch.nn.utils.clip_grad_norm_``). ``per_param``: each parameter's gradient
    scaled to norm at most ``max_norm`` on its own (DINO's ``clip_gradients``, used by CrIBo, SelfPatch, DropPos).
    Parameters without a gradient (e.g. cancelled by ``before_optimizer_step``) are skipped.
    """
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if mode != "per_param":
        raise DensekitError(f"optim.grad_clip_mode must be global or per_param, got {mode!r}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack([g.detach().float().norm(2) for g in grads])
    for g, n in zip(grads, norms):
        coef = max_norm / (float(n) + 1e-6)
        if coef < 1.0:
            g.mul_(coef)
    return norms.norm(2)


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``, then half-cosine to ``min_lr_ratio*lr``.

    ``max_steps`` is the schedule length (default ``cfg.max_steps``; a time budget sets its own). The warm-up +
    cosine shape is the one of SimCLR/BYOL/DINO (Loshchilov & Hutter's SGDR without restarts).
    """
    n = max_steps or cfg.max_steps
    base, w = cfg.optim.lr, warmup_steps(cfg, n)
    if w > 0 and step < w:
        return base * (step + 1) / w
    t = (step - w) / max(1, n - w)
    floor = base * cfg.optim.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------------
# State (safetensors + JSON)
# ----------------------------------------------------------------------------------------------------


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser ``state_dict`` into tensors (``optim.<param id>.<key>``) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": _jsonable(sd["param_groups"]), "state": {}}
    for pid, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = _cpu(v)
                entry[k] = {"tensor": f"optim.{pid}.{k}"}
            else:
                entry[k] = {"value": _jsonable(v)}
        rest["state"][str(pid)] = entry
    return tensors, rest


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in rest["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU/CUDA as bytes (base64), numpy and python as JSON lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": [np_state[0], np.asarray(np_state[1]).tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in st and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in st["cuda"]]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a training state: safetensors tensors + the JSON ``meta`` in the file metadata (atomic), with the
    SHA-256 of its contents (:func:`densekit.serve.checkpoint.write_with_digest`)."""
    from safetensors.torch import save_file

    from densekit.serve.checkpoint import write_with_digest

    with atomic_path(path) as tmp:
        write_with_digest(tmp, {STATE_META_KEY: json.dumps(meta)},
                          lambda md: save_file(tensors, str(tmp), metadata=md))


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a state written by :func:`save_state` -> (tensors, meta). DensekitError (one line) if unreadable,
    not a densekit state, malformed, or not matching its checksum (a state from before the checksum loads)."""
    from safetensors import SafetensorError, safe_open

    from densekit.serve.checkpoint import verify_digest
    from densekit.serve.meta_schema import STATE_DEPTH, loads_bounded

    try:
        with safe_open(str(path), framework="pt") as fh:
            md = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DensekitError(f"{path}: unreadable training state ({' '.join(str(exc).split())[:200]})") from None
    if STATE_META_KEY not in md:
        raise DensekitError(f"{path}: not a densekit training state")
    if not verify_digest(path, "training state"):
        log.info("%s has no checksum (written by an older densekit): its contents are not verified", path)
    meta = loads_bounded(md[STATE_META_KEY], f"{path}: the training state's metadata", max_depth=STATE_DEPTH)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DensekitError(f"{path}: training state format {got} is not supported")
    return tensors, meta


def truncate_log(path: Path, step: int) -> None:
    """Drop the records of ``log.jsonl`` past ``step`` (and a line torn by a kill), atomically: a resumed run
    redoes those steps and logs them again, so each step is logged once."""
    if not path.is_file():
        return
    from densekit.serve.meta_schema import STATE_DEPTH, loads_bounded

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            rec = loads_bounded(line, "a log record", max_depth=STATE_DEPTH)
        except DensekitError:
            continue
        inner = [v for v in rec.values() if isinstance(v, dict)] if isinstance(rec, dict) else []
        steps = [r.get("step") for r in [rec, *inner] if isinstance(r, dict)]
        if not any(isinstance(s, (int, float)) and s > step for s in steps):
            kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.XXXX.SUFFIX``, :func:`~densekit.serve.atomic.atomic_path`) that a run
    killed while writing a file of ``run_dir`` left behind; returns them."""
    gone = []
    for name in (STATE_FILE, BACKBONE_FILE, CONFIG_FILE, LOG_FILE):
        for tmp in run_dir.glob(f".{name}.*{Path(name).suffix}"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def check_run_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as a run directory: DensekitError (one line) if it, or a folder above it, is a file."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise DensekitError(f"--out {out}: {p} is an existing file, not a folder; a run directory goes there")
    return out


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    out: Path
    step: int
    halted: bool
    images_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)
    max_steps: int = 0  #: the schedule length (``max_steps``, or what the budget calibration set)
    clock: str = "wall"  #: the clock ``seconds`` (and ``budget_s``) count
    seconds: float = 0.0  #: time on ``clock`` from the start of the run to its end (resumed parts included)
    wall_s: float = 0.0  #: wall seconds of this ``fit`` call
    budget_s: float = 0.0  #: the budget (0: none)
    stopped_by_budget: bool = False  #: the budget ran out before ``max_steps``
    seconds_per_step: float | None = None  #: the budget calibration's estimate (on ``clock``)


@dataclass
class _Run:
    """What every step of one ``fit`` uses."""

    model: Objective
    fwd: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler
    params: list[nn.Parameter]
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    decay_groups: list[int] = field(default_factory=list)  # optimiser groups that take weight decay


def _dataloader_error(exc: DensekitError) -> DensekitError:
    """DataLoader workers re-raise with a traceback in the message: keep the original one-line reason."""
    text = str(exc)
    if "\n" not in text:
        return exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1]
    if "DensekitError:" in last:
        last = last.split("DensekitError:", 1)[1].strip()
    return DensekitError(last)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else cpu; explicit names are checked."""
    if name == "auto":
        return torch.device(f"cuda:{dist.local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DensekitError(f"device {name!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{dist.local_rank()}")
    return dev


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`.

    Args:
        cfg: the resolved config (``cfg.out`` is the run directory).
        resume: continue from ``cfg.out/state.safetensors``.
        objective_cls: use this class instead of looking ``cfg.objective`` up.
        backbone_fn: build the student backbone from the config (default: ``cfg.backbone`` via
            :func:`densekit.serve.backbones.build_backbone`, or a ``.safetensors`` checkpoint to start from).
        hooks: callables ``hook(trainer, step)`` run after each completed step (after any checkpoint).
        evaluator: ``evaluator(backbone, eval_config, device) -> {"J&F", "J", "F"}``, run every
            ``eval.every`` steps when ``eval.davis`` is set. ``densekit train`` passes
            :func:`densekit.retrieval.backbone_eval.davis_jf_for_config`; it is injected because train/
            does not import retrieval/ (the import direction of the house).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        objective_cls: type[Objective] | None = None,
        backbone_fn: Callable[[TrainConfig], nn.Module] | None = None,
        hooks: Iterable[Hook] = (),
        evaluator: Evaluator | None = None,
    ) -> None:
        if not cfg.out:
            raise DensekitError("no output directory: pass --out RUN_DIR")
        if not cfg.data.path:
            raise DensekitError("no training data: pass --data PATH")
        self.cfg = cfg
        self.resume = resume
        self.objective_cls = objective_cls or get_objective_class(cfg.objective)
        if not cfg.objective:
            cfg.objective = self.objective_cls.name or self.objective_cls.__name__
        self.backbone_fn = backbone_fn
        self.hooks = list(hooks)
        if cfg.eval.davis and evaluator is None:
            raise DensekitError("eval.davis is set but no evaluator was given (densekit train passes one)")
        self.evaluator = evaluator
        self.out = check_run_dir(cfg.out)
        self.step = 0
        self.max_steps = cfg.max_steps  # the schedule length; a budget run's calibration sets it
        self.budget = Budget(cfg.budget_s, cfg.clock)
        self.resumed_schedule = False
        self._replan: Replan | None = None
        self.model: Objective | None = None
        self._first_step = True

    # -- building ------------------------------------------------------------------------------------

    def _build_backbone(self) -> nn.Module:
        cfg = self.cfg
        if self.backbone_fn is not None:
            return self.backbone_fn(cfg)
        from densekit.serve.backbones import build_backbone
        from densekit.serve.loader import PICKLE_SUFFIXES, load_backbone

        if Path(cfg.backbone).suffix.lower() in PICKLE_SUFFIXES:
            load_backbone(cfg.backbone)  # the one line every command gives: densekit never unpickles it
        if cfg.backbone.lower().endswith(".safetensors"):
            from densekit.serve.checkpoint import load_checkpoint

            if cfg.backbone_kwargs:
                raise DensekitError("backbone_kwargs do not apply to a checkpoint: its architecture is in its metadata")
            return load_checkpoint(cfg.backbone)
        decoder = cfg.decoder if cfg.decoder is not None else bool(getattr(self.objective_cls, "backbone_decoder", False))
        return build_backbone(cfg.backbone, seed=cfg.seed, decoder=decoder, kwargs=cfg.backbone_kwargs)

    def _build_objective(self) -> Objective:
        cfg = self.cfg
        cfg.hparams = resolve_hparams(self.objective_cls, cfg.hparams)
        defaults = resolve_hparams(self.objective_cls, {})
        # Only values that differ from the (JSON form of the) defaults are passed, so the constructor keeps its
        # own default objects (tuples, callables) and a resumed run builds exactly what the first run built.
        kwargs = {k: v for k, v in cfg.hparams.items() if k not in defaults or defaults[k] != v}
        backbone = self._build_backbone().train()
        torch.manual_seed(cfg.seed)  # head initialisation is a function of the seed
        name = self.objective_cls.name or self.objective_cls.__name__
        try:
            model = self.objective_cls(backbone, **kwargs)
        except DensekitError:
            raise
        except (ValueError, TypeError, RuntimeError, AssertionError, KeyError, NotImplementedError) as exc:
            raise DensekitError(
                f"objective {name} does not fit backbone {cfg.backbone}: {one_line(exc)}"
            ) from exc
        if model.data not in ("pairs", "images"):
            raise DensekitError(f"objective {name} declares data={model.data!r}; expected 'pairs' or 'images'")
        if cfg.finetune.freeze_until:
            from densekit.train.finetune import freeze_until

            freeze_until(model.student_backbone(), cfg.finetune.freeze_until)
        return model

    def _build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from densekit.train.finetune import backbone_parameter_ids, check_lr_mult

        o, mult = self.cfg.optim, self.cfg.finetune.backbone_lr_mult
        check_lr_mult(mult)
        in_backbone = backbone_parameter_ids(model) if mult != 1.0 else set()
        # (decay?, backbone?) -> parameters; the backbone gets its own groups only when its rate differs
        split: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            # No weight decay on biases and norm scales (1-d), the common practice of MoCo v3/DINO/timm.
            split.setdefault((p.ndim > 1, id(p) in in_backbone), []).append(p)
        keys = [k for k in ((True, False), (False, False), (True, True), (False, True)) if k in split]
        groups = [{"params": split[k], "weight_decay": o.weight_decay if k[0] else 0.0, "lr_scale": mult if k[1] else 1.0}
                  for k in keys]
        if mult == 1.0:
            for g in groups:  # the groups of runs from before the setting existed, so that they resume
                del g["lr_scale"]
        # by position: loading an optimiser state replaces the dicts
        self._decay_groups = [i for i, k in enumerate(keys) if k[0]]
        if not groups:
            raise DensekitError("the objective has no trainable parameters")
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.betas[0], o.betas[1]))

    # -- state ---------------------------------------------------------------------------------------

    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = _rng_state()
        if dist.world_size() == 1:
            return [mine]
        import torch.distributed as td

        out: list[Any] = [None] * dist.world_size()
        td.all_gather_object(out, mine)  # in-memory only; what is written is JSON
        return out

    def _save_state(self, model: Objective, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        rngs = self._gather_rng()
        if dist.rank() == 0:
            tensors = {f"model.{k}": _cpu(v) for k, v in model.state_dict().items()}
            opt_t, opt_rest = optimizer_to_flat(optimizer.state_dict())
            tensors.update(opt_t)
            meta = {
                "format": STATE_FORMAT,
                "step": self.step,
                "world_size": dist.world_size(),
                "config": to_dict(self.cfg),
                "optimizer": opt_rest,
                "scaler": _jsonable(scaler.state_dict()) if scaler is not None else {},
                "rng": rngs,
                "torch_version": torch.__version__,
                "time": time.time(),
                "max_steps": self.max_steps,
                "clock": self.cfg.clock,
                "budget_used_s": self.budget.elapsed(),
            }
            save_state(self.out / STATE_FILE, tensors, meta)
        dist.barrier()

    def _load_state(self, model: Objective, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise DensekitError(f"cannot resume: no {STATE_FILE} in {self.out}")
        try:
            tensors, meta = load_state(path)
        except DensekitError as exc:  # a corrupt state is refused: training on from it would be silently wrong
            raise DensekitError(f"cannot resume: {exc}") from None
        try:
            self._restore(model, optimizer, scaler, tensors, meta)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DensekitError(f"cannot resume: {path}: malformed training state ({one_line(exc)})") from None

    def _restore(self, model: Objective, optimizer: torch.optim.Optimizer, scaler: Any,
                 tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Put the state read by :func:`load_state` into the model, optimiser, grad scaler, step and RNGs."""
        path = self.out / STATE_FILE
        try:  # a run saved before a config key existed has that key's default
            old = flat(to_dict(from_dict(TrainConfig, meta["config"])))
        except DensekitError:
            old = flat(meta["config"])
        new = flat(to_dict(self.cfg))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            k = changed[0]
            raise DensekitError(
                f"cannot resume with a different {k} ({old.get(k)!r} -> {new.get(k)!r}); "
                f"{len(changed)} setting(s) differ from the saved run"
            )
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(model_sd, strict=True)
        except RuntimeError as exc:
            raise DensekitError(f"{path}: saved model state does not fit this objective: {one_line(exc)}") from None
        optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        # a budget run's schedule length was measured once; the resumed part keeps it (and the time spent)
        self.max_steps = int(meta.get("max_steps", self.cfg.max_steps))
        self.budget.used = float(meta.get("budget_used_s", 0.0))
        self.resumed_schedule = "max_steps" in meta
        rngs = meta["rng"]
        if meta["world_size"] != dist.world_size():
            log.warning("resuming a %d-process run with %d processes: RNG streams of ranks > 0 are re-seeded; "
                        "the result is not bit-identical", meta["world_size"], dist.world_size())
        _set_rng_state(rngs[dist.rank()] if dist.rank() < len(rngs) else rngs[0])

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until ``max_steps``, ``halt_at`` or the end of the time budget (``budget_s``); returns a
        :class:`TrainResult` (on every rank)."""
        cfg = self.cfg
        device = resolve_device(cfg.device)
        started_dist = False
        if dist.env_requests_distributed() and not dist.is_distributed():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            started_dist = dist.init_from_env(str(device))
        prev_det = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        try:
            return self._fit(device)
        finally:
            torch.use_deterministic_algorithms(prev_det)
            if started_dist:
                import torch.distributed as td

                td.destroy_process_group()

    def _fit(self, device: torch.device) -> TrainResult:
        from densekit.train.data import build_dataset

        cfg = self.cfg
        self.budget = Budget(cfg.budget_s, cfg.clock)  # the budget counts from here: building is training time
        wall0 = time.perf_counter()
        rank, world = dist.rank(), dist.world_size()
        state_path = self.out / STATE_FILE
        if not self.resume and state_path.exists():
            raise DensekitError(f"{self.out} already holds a training run; pass --resume or choose another --out")
        if cfg.batch_size % world:
            raise DensekitError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        model = self._build_objective()
        self.model = model
        dataset = build_dataset(
            cfg.data.path, model.data, model.transform(), seed=cfg.seed, size=(cfg.data.size[0], cfg.data.size[1]),
            kind=cfg.data.kind, split=cfg.data.split, gap_min=cfg.data.gap_min, gap_max=cfg.data.gap_max,
            crop=cfg.data.crop, crop_scale=cfg.data.crop_scale, frame_step=cfg.data.frame_step,
            skip_short=cfg.data.skip_short,
        )
        model.check_dataset(len(dataset))
        model.to(device)
        if world > 1 and cfg.ddp.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
            self.model = model
        optimizer = self._build_optimizer(model)
        use_amp = device.type == "cuda" and cfg.precision in ("auto", "fp16", "bf16")
        amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

        if self.resume:
            self._load_state(model, optimizer, scaler)
        else:
            torch.manual_seed(cfg.seed + rank)  # per-rank stream for objectives' torch randomness
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if remove_stale_temporaries(self.out):
                log.info("removed temporary files a killed run left in %s", self.out)
            truncate_log(self.out / LOG_FILE, self.step)  # steps after the state are redone: logged once
            write_text_atomic(self.out / CONFIG_FILE, dump_yaml(cfg))
        dist.barrier()

        fwd: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=cfg.ddp.find_unused_parameters,
                      **dist.ddp_buffer_kwargs(cfg.ddp.broadcast_buffers))
        run = _Run(model, fwd, optimizer, scaler, [p for p in model.parameters() if p.requires_grad], device,
                   use_amp, amp_dtype, list(self._decay_groups))
        per_step, self._replan = None, None
        if cfg.budget_s > 0 and not self.resumed_schedule and self.step == 0 and cfg.max_steps > CALIBRATION_STEPS:
            per_step = self._calibrate(run, dataset)
            self._replan = Replan(self.budget, cfg.max_steps)
            self.max_steps = self.budget.schedule_length(per_step, cfg.max_steps)
            if rank == 0:
                self._record({"budget": {"budget_s": cfg.budget_s, "clock": cfg.clock, "seconds_per_step": per_step,
                                         "calibration_steps": CALIBRATION_STEPS, "max_steps": self.max_steps,
                                         "elapsed_s": self.budget.elapsed()}})
        result = self._loop(run, dataset)
        result.seconds_per_step = per_step
        result.wall_s = time.perf_counter() - wall0
        if rank == 0:
            self._record({"end": {"step": self.step, "max_steps": self.max_steps, "clock": cfg.clock,
                                  "seconds": result.seconds, "wall_s": result.wall_s, "budget_s": cfg.budget_s,
                                  "stopped_by_budget": result.stopped_by_budget, "halted": result.halted}})
        return result

    def _train_step(self, run: _Run, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float, torch.Tensor]:
        """One optimiser step at ``self.step`` (the objective's ``on_step_end`` included, ``self.step`` not
        advanced) -> (objective outputs, learning rate, grad norm)."""
        cfg = self.cfg
        batch = {k: (v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        lr = lr_at(self.step, cfg, self.max_steps)
        for g in run.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # finetune.backbone_lr_mult
        if cfg.optim.weight_decay_end is not None:
            wd = weight_decay_at(self.step, cfg, self.max_steps)
            for i in run.decay_groups:
                run.optimizer.param_groups[i]["weight_decay"] = wd
        try:
            with torch.autocast(device_type=run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
                out = run.fwd(batch)
            loss = out["loss"]
        except DensekitError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError, AssertionError) as exc:
            if not self._first_step:
                raise
            raise DensekitError(
                f"objective {cfg.objective} failed on backbone {cfg.backbone} at its first step: {one_line(exc)}"
            ) from exc
        if not torch.isfinite(loss.detach()).all():
            raise DensekitError(f"the loss became non-finite at step {self.step}; lower optim.lr or check the data")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if run.scaler.is_enabled():
            run.scaler.unscale_(run.optimizer)  # the hook and the clipping see true gradients
        run.model.before_optimizer_step(self.step, self.max_steps)
        grad_norm = torch.zeros(())
        if cfg.optim.grad_clip > 0:
            grad_norm = clip_gradients(run.params, cfg.optim.grad_clip, cfg.optim.grad_clip_mode)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.model.on_step_end(self.step, self.max_steps)
        self._first_step = False
        return out, lr, grad_norm

    def _batches(self, dataset: Any, start: int, end: int, device: torch.device) -> Iterator[dict[str, Any]]:
        """This rank's batches of steps ``[start, end)`` (a pure function of seed and step)."""
        from densekit.train.data import StepBatchSampler, make_loader

        cfg = self.cfg
        sampler = StepBatchSampler(start, end, cfg.batch_size, dist.rank(), dist.world_size())
        collate = self.model.collate() if self.model is not None else None
        loader = make_loader(dataset, sampler, num_workers=cfg.data.num_workers, seed=cfg.seed,
                             pin_memory=device.type == "cuda", collate=collate)
        it = iter(loader)
        try:
            while True:
                try:
                    yield next(it)
                except StopIteration:
                    return
                except DensekitError as exc:
                    raise _dataloader_error(exc) from None
        finally:
            # workers end here, on an exception too, not when the garbage collector gets to the iterator
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it

    def _calibrate(self, run: _Run, dataset: Any) -> float:
        """Time :data:`~densekit.train.budget.CALIBRATION_STEPS` real steps on the budget's clock, then put the
        model, optimiser, grad scaler and RNGs back as they were: the run that follows is the run a plain
        ``max_steps`` config would give. Returns seconds per step (rank 0's, so every rank sizes alike)."""
        model_sd = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        opt_sd = copy.deepcopy(run.optimizer.state_dict())
        scaler_sd = copy.deepcopy(run.scaler.state_dict())
        rng = _rng_state()
        step0, timer = self.step, StepTimer(self.cfg.clock)
        try:
            for batch in self._batches(dataset, step0, step0 + CALIBRATION_STEPS, run.device):
                self._train_step(run, batch)
                self.step += 1
                timer.tick()
        finally:
            self.step = step0
        run.model.load_state_dict(model_sd)
        run.optimizer.load_state_dict(opt_sd)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.load_state_dict(scaler_sd)
        _set_rng_state(rng)
        est = torch.tensor([timer.seconds_per_step()], dtype=torch.float64, device=run.device)
        return float(dist.broadcast_(est).item())

    def _loop_end(self) -> int:
        """The step the loop runs to: the schedule's end, or ``halt_at`` when that comes first."""
        return self.max_steps if not self.cfg.halt_at else min(self.max_steps, self.cfg.halt_at)

    def _replanned(self, replan: Replan, device: torch.device) -> bool:
        """Rank 0's re-plan of the schedule length after this step (:class:`~densekit.train.budget.Replan`),
        taken by every rank; True when the length changed."""
        due = replan.due(self.step) if dist.rank() == 0 else None
        new = torch.tensor([float(due[0]) if due else 0.0], dtype=torch.float64, device=device)
        new = int(dist.broadcast_(new).item())
        if new <= 0 or new == self.max_steps:
            return False
        if dist.rank() == 0 and due:
            self._record({"replan": {"step": self.step, "max_steps": new, "was": self.max_steps,
                                     "seconds_per_step": due[1], "elapsed_s": self.budget.elapsed()}})
        self.max_steps = new
        return True

    def _budget_spent(self, device: torch.device) -> bool:
        """Rank 0's view of the budget, so that every rank stops after the same step."""
        if self.cfg.budget_s <= 0:
            return False
        flag = torch.tensor([1.0 if self.budget.spent() else 0.0], device=device)
        return bool(dist.broadcast_(flag).item() > 0)

    def _loop(self, run: _Run, dataset: Any) -> TrainResult:
        """Steps until the schedule ends, ``halt_at`` or the budget; then the state and (unless halted) the export."""
        cfg, rank, world = self.cfg, dist.rank(), dist.world_size()
        end = self._loop_end()
        writer = self._tensorboard() if rank == 0 else None
        bar = None
        if rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=f"train {cfg.objective}", unit="step",
                       dynamic_ncols=True)
        result = TrainResult(self.out, self.step, False, 0.0, max_steps=self.max_steps, clock=cfg.clock,
                             budget_s=cfg.budget_s)
        t_start, imgs = time.perf_counter(), 0
        run.model.train()
        replan = self._replan
        if replan is not None:  # the schedule may grow: the data runs to the cap, the loop to ``end``
            replan.start(self.step)
        last = min(cfg.max_steps, cfg.halt_at or cfg.max_steps) if replan is not None else end
        batches = self._batches(dataset, self.step, last, run.device)
        try:
            while self.step < end and not self._budget_spent(run.device):
                batch = next(batches, None)
                if batch is None:  # pragma: no cover - the sampler yields exactly the steps asked
                    break
                out, lr, grad_norm = self._train_step(run, batch)
                self.step += 1
                # a packed batch's first tensor is (sequences, ...), not (images, ...)
                n_img = int(batch["num_images"]) if "num_images" in batch else len(next(iter(batch.values())))
                imgs += n_img * world
                result.images_per_s = imgs / max(time.perf_counter() - t_start, 1e-9)
                if self.step % cfg.log_every == 0 or self.step == end:
                    self._log_step(writer, bar, result, out, lr, grad_norm)
                if replan is not None and self._replanned(replan, run.device):
                    end = self._loop_end()
                    result.max_steps = self.max_steps
                    if bar is not None:
                        bar.total = self.max_steps
                if bar is not None:
                    bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self._save_state(run.model, run.optimizer, run.scaler)
                if cfg.eval.davis and cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.max_steps:
                    result.evals.append(self._evaluate(run.model, writer, run.device))
                for hook in self.hooks:
                    hook(self, self.step)
            batches.close()  # DataLoader workers stop before the state is written
            result.stopped_by_budget = self.step < end and self._budget_spent(run.device)
            self._save_state(run.model, run.optimizer, run.scaler)
            result.step = self.step
            if self.step >= self.max_steps or result.stopped_by_budget:
                if rank == 0:
                    self._export(run.model, stopped_early=self.step < self.max_steps)
                if cfg.eval.davis:
                    result.evals.append(self._evaluate(run.model, writer, run.device))
                dist.barrier()
            else:
                result.halted = True
            result.seconds = self.budget.elapsed()
        finally:
            batches.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return result

    def _log_step(self, writer: Any, bar: Any, result: TrainResult, out: dict[str, torch.Tensor], lr: float,
                  grad_norm: torch.Tensor) -> None:
        scalars = {k: float(dist.all_reduce_mean(v.detach().float()).item())
                   for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        scalars.update(lr=lr, grad_norm=float(grad_norm), images_per_s=result.images_per_s)
        if self.cfg.optim.weight_decay_end is not None:
            scalars["weight_decay"] = weight_decay_at(self.step - 1, self.cfg, self.max_steps)
        result.metrics = scalars
        if dist.rank() == 0:
            self._log(writer, scalars)
            if bar is not None:
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{lr:.2e}")

    # -- helpers -------------------------------------------------------------------------------------

    def _tensorboard(self) -> Any:
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard scalars")
            return None
        return SummaryWriter(log_dir=str(self.out / "tb"))

    def _log(self, writer: Any, scalars: dict[str, float]) -> None:
        if writer is not None:
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, self.step)
        self._record({"step": self.step, **scalars})

    def _record(self, obj: dict[str, Any]) -> None:
        """Append one JSON line to ``log.jsonl``."""
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj) + "\n")

    def _evaluate(self, model: Objective, writer: Any, device: torch.device) -> dict[str, float]:
        ev = self.cfg.eval
        scores: dict[str, float] = {}
        if dist.rank() == 0:
            t0 = time.perf_counter()
            assert self.evaluator is not None  # checked in __init__
            scores = self.evaluator(model.export_backbone(), ev, str(device))
            scores = {"step": float(self.step), **scores, "seconds": time.perf_counter() - t0}
            if writer is not None:
                for k in ("J&F", "J", "F"):
                    writer.add_scalar(f"eval/{k}", scores[k], self.step)
            self._record({"eval": scores})
            log.info("step %d: J&F %.4f (J %.4f, F %.4f)", self.step, scores["J&F"], scores["J"], scores["F"])
        dist.barrier()
        return scores

    def _export(self, model: Objective, stopped_early: bool = False) -> None:
        from densekit.serve.backbones import DenseBackbone
        from densekit.serve.checkpoint import save_checkpoint

        chosen = model.export_backbone()
        if not isinstance(chosen, DenseBackbone):
            raise DensekitError("export_backbone() must return a DenseBackbone")
        exported = copy.deepcopy(chosen).to("cpu").eval()
        exported.meta = dataclasses.replace(exported.meta, objective=self.objective_cls.name or self.cfg.objective)
        save_checkpoint(exported, self.out / BACKBONE_FILE, extra_meta={
            "train_steps": self.step, "train_seed": self.cfg.seed, "train_hparams": self.cfg.hparams,
            "train_max_steps": self.max_steps, "stopped_early": stopped_early,
            "train_clock": self.cfg.clock, "train_seconds": self.budget.elapsed(), "train_budget_s": self.cfg.budget_s,
        })


def load_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.yaml`` of a run directory as a dict (for ``--resume``)."""
    from densekit.train.config import load_yaml

    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        raise DensekitError(f"cannot resume: no {CONFIG_FILE} in {run_dir}")
    return load_yaml(p)


def train(cfg: TrainConfig, *, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Build a :class:`Trainer` and run it (see its arguments)."""
    return Trainer(cfg, resume=resume, **kwargs).fit()


__all__ = [
    "Trainer", "TrainResult", "train", "lr_at", "weight_decay_at", "clip_gradients", "get_objective_class", "available_objectives",
    "resolve_hparams", "save_state", "load_state", "load_run_config", "from_dict", "truncate_log",
    "remove_stale_temporaries", "check_run_dir",
]
