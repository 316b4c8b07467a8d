"""Training configuration: typed dataclasses with defaults, YAML load, ``key=value`` overrides, full dump.

Precedence (lowest first): dataclass defaults < ``--config cfg.yaml`` < command-line flags (objective, backbone,
data, out) < ``key=value`` overrides. Keys are dotted paths (``optim.lr=3e-4``, ``data.size=[128,128]``,
``hparams.temperature=0.2``); values are parsed as YAML scalars/lists and checked against the field's type, so a
typo or a wrong type is one clear :class:`DensekitError` line. ``hparams.*`` are the objective's keyword
arguments; the trainer checks them against the objective's ``__init__`` signature and writes the resolved values
(defaults included) to ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from densekit.serve.errors import DensekitError


@dataclass
class DataConfig:
    """Where the frames come from and how they are sampled (see :mod:`densekit.train.data`)."""

    path: str = ""
    kind: Literal["auto", "davis", "videos", "frames", "images"] = "auto"
    split: str | None = None  # DAVIS ImageSets split; None = every sequence
    size: list[int] = field(default_factory=lambda: [224, 224])  # training crop [height, width]
    crop: Literal["random", "center"] = "random"
    crop_scale: float = 1.0  # >1 resizes frames larger than the crop, so the crop position varies more
    gap_min: int = 1  # "pairs": frame gap d in [gap_min, gap_max]
    gap_max: int = 10
    frame_step: int = 1  # "images" from videos: use every n-th frame
    skip_short: bool = False  # drop (instead of refusing) videos shorter than gap_min + 1 frames
    num_workers: int = 2


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warm-up, then cosine to ``min_lr_ratio * lr``)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # for the global batch; no implicit scaling
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    warmup_steps: int = 0  # <0: 5% of max_steps
    min_lr_ratio: float = 0.0
    grad_clip: float = 3.0  # max grad norm; 0 disables
    # global: one norm over all parameters; per_param: each parameter's gradient clipped alone (DINO, CrIBo, DropPos)
    grad_clip_mode: Literal["global", "per_param"] = "global"
    # None: constant weight_decay; else a cosine from weight_decay to this over the schedule (DINO: 0.04 -> 0.4)
    weight_decay_end: float | None = None


@dataclass
class EvalConfig:
    """Optional J&F evaluation on a DAVIS-format folder during training."""

    davis: str | None = None  # DAVIS-format root; None disables
    every: int = 0  # steps between evaluations (0: only at the end when davis is set)
    split: str | None = None
    sequences: list[str] | None = None
    max_sequences: int = 0  # 0 = all
    preset: Literal["dino", "crw", "live"] = "crw"
    short_side: int = 0  # resize frames so the shorter side is this before propagation (0: keep)


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained start (see :mod:`densekit.train.finetune`)."""

    freeze_until: str | None = None  # a backbone stage: it, the stages before it and the stem are frozen
    backbone_lr_mult: float = 1.0  # the backbone's learning rate is this times the schedule's (heads: 1x)


@dataclass
class DDPConfig:
    """DistributedDataParallel knobs (used only under torchrun with WORLD_SIZE > 1)."""

    find_unused_parameters: bool = True
    broadcast_buffers: bool = False  # objectives keep queues in sync themselves (concat_all_gather)
    sync_bn: bool = False  # CUDA only: SyncBatchNorm does not run on CPU tensors


@dataclass
class TrainConfig:
    """Everything a training run needs; ``RUN_DIR/config.yaml`` is this, fully resolved."""

    objective: str = ""
    backbone: str = "resnet18"
    # timm keyword arguments for a ``timm:`` backbone (depth, patch_size, img_size, drop_path_rate, class_token,
    # global_pool, no_embed_class...): stored in the exported checkpoint's meta.arch["kwargs"]
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    decoder: bool | None = None  # None: the objective's ``backbone_decoder`` class attribute (default False)
    out: str = ""
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32  # global batch (split evenly over processes)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 AMP on CUDA, fp32 on CPU
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) (needed for bit-exact resume)
    save_every: int = 100  # steps between state checkpoints (0: only at the end)
    log_every: int = 10
    halt_at: int = 0  # stop after this step as if killed (checkpoint first); 0: never. For tests/preemption.
    # A time budget (0: none): the trainer times a few steps, sizes the schedule so that it ends with the budget
    # (at most max_steps), stops once the budget is spent and exports (see densekit.train.budget).
    budget_s: float = 0.0
    # what budget_s counts: CPU time of this process tree (steady when other work shares the machine), or wall
    clock: Literal["wall", "cpu"] = "cpu"
    progress: bool = True
    tensorboard: bool = True
    hparams: dict[str, Any] = field(default_factory=dict)  # objective keyword arguments
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)


#: keys that may change when resuming (they do not change the arithmetic of training)
RESUMABLE_CHANGES = frozenset({
    "progress", "tensorboard", "log_every", "save_every", "halt_at", "data.num_workers", "device",
    "eval.davis", "eval.every", "eval.split", "eval.sequences", "eval.max_sequences", "eval.preset",
    "eval.short_side", "out", "data.path",
})


# ----------------------------------------------------------------------------------------------------
# Type checking of values
# ----------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against (and mildly converted to) type ``tp``; DensekitError otherwise.

    Conversions: int -> float; a tuple -> list; a comma string "a,b" for a list field. bool is never an int.
    """
    def bad() -> DensekitError:
        return DensekitError(f"config {key}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad()
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, key)
            except DensekitError:
                continue
        raise bad()
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if origin in (list, tuple):
        if isinstance(value, str) and "," in value:
            value = [yaml.safe_load(v.strip()) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad()
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=f"{key}.")
        raise bad()
    raise bad()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise DensekitError."""
    if not isinstance(data, dict):
        raise DensekitError(f"config {prefix.rstrip('.') or 'root'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise DensekitError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known under "
            f"{prefix.rstrip('.') or 'root'}: {', '.join(names)}"
        )
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (lists, dicts, scalars only)."""
    return dataclasses.asdict(cfg)


#: the CPU-sized configs shipped with densekit (installed as package data, so a pip install has them too)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs in :data:`CONFIG_DIR` (without ``.yaml``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped config of that name (``hiergroup_finetune_lite0``
    or ``hiergroup_finetune_lite0.yaml``); neither -> one line naming the shipped ones."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if len(p.parts) == 1 and shipped.is_file():
        return shipped
    raise DensekitError(f"config file not found: {p} (shipped configs: {', '.join(shipped_configs())})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (or a shipped config by name, see :func:`resolve_config_path`) into a dict
    (empty file -> {})."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise DensekitError(f"config file {p} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DensekitError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML (``[1,2]``, ``true``, ``null``)."""
    if "=" not in text:
        raise DensekitError(f"override {text!r} must look like key=value (e.g. optim.lr=0.001)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DensekitError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_by_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for key ``"a.b"`` (creating nested dicts)."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise DensekitError(f"config {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("hparams", "backbone_kwargs"):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    **flags: Any,
) -> TrainConfig:
    """Resolve a :class:`TrainConfig` from defaults, an optional YAML file, flags and ``key=value`` overrides.

    Args:
        yaml_path: optional YAML file (a full or partial config, nested like ``config.yaml``).
        overrides: ``key=value`` strings, applied last.
        base: a starting dict (e.g. a previous run's config.yaml) applied before the YAML file.
        **flags: top-level values (``objective``, ``backbone``, ``out``) and ``data_path``; None values are skipped.
    """
    data: dict[str, Any] = to_dict(TrainConfig())
    if base:
        data = _merge(data, base)
    if yaml_path is not None:
        data = _merge(data, load_yaml(yaml_path))
    for k, v in flags.items():
        if v is None:
            continue
        if k == "data_path":
            data["data"]["path"] = str(v)
        else:
            data[k] = v
    for text in overrides:
        key, value = parse_override(text)
        set_by_path(data, key, value)
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that types alone do not catch."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise DensekitError(f"config {msg}")

    need(cfg.max_steps >= 1, f"max_steps must be >= 1, got {cfg.max_steps}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.save_every >= 0 and cfg.log_every >= 1, "save_every must be >= 0 and log_every >= 1")
    need(cfg.halt_at >= 0, f"halt_at must be >= 0, got {cfg.halt_at}")
    need(cfg.budget_s >= 0 and math.isfinite(cfg.budget_s), f"budget_s must be >= 0 seconds, got {cfg.budget_s}")
    need(len(cfg.data.size) == 2 and min(cfg.data.size) >= 8, f"data.size must be [height, width] >= 8, got {cfg.data.size}")
    need(0 <= cfg.data.gap_min <= cfg.data.gap_max, f"need 0 <= data.gap_min <= data.gap_max, got {cfg.data.gap_min}, {cfg.data.gap_max}")
    need(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    need(cfg.data.crop_scale >= 1.0, f"data.crop_scale must be >= 1, got {cfg.data.crop_scale}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0 and cfg.optim.grad_clip >= 0, "optim.weight_decay and optim.grad_clip must be >= 0")
    need(cfg.optim.weight_decay_end is None or cfg.optim.weight_decay_end >= 0,
         f"optim.weight_decay_end must be >= 0 (or null), got {cfg.optim.weight_decay_end}")
    need(len(cfg.optim.betas) == 2, f"optim.betas must have 2 values, got {cfg.optim.betas}")
    need(0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    need(cfg.eval.every >= 0, "eval.every must be >= 0")
    dev = cfg.device
    need(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")


def dump_yaml(cfg: TrainConfig) -> str:
    """The full resolved config as YAML text (what ``RUN_DIR/config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (hparams are kept whole, as one value)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "hparams":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
