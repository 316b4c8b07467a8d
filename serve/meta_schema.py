"""The one schema every piece of densekit metadata is read through: bounded JSON, then typed, ranged fields.

Metadata comes from files a user hands us (safetensors metadata, ONNX ``metadata_props``, the ``.json`` sidecar
of a TensorRT engine, a training state), so it is hostile input: any JSON at all, nested arbitrarily deep.
:func:`loads_bounded` measures the nesting depth with a flat scan *before* ``json.loads`` (whose C scanner
recurses and raises ``RecursionError`` on a 100,000-deep array), and :func:`check_contract` /
:func:`check_sidecar` check each field's type and range, so that anything else is one
:class:`~densekit.serve.errors.DensekitError` line (exit 2 from the CLI), never a traceback.

This module imports nothing of densekit but the error type: :mod:`densekit.serve.contract` and
:mod:`densekit.serve.onnx_meta` build their objects from what it returns.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from densekit.serve.errors import DensekitError, one_line

#: nesting depth allowed in a model contract (the object, ``arch``, ``arch.kwargs``, a list in it, ...)
CONTRACT_DEPTH = 12
#: the contract is a few hundred bytes; a megabyte is far beyond any real one
CONTRACT_CHARS = 1 << 20
#: an engine sidecar nests the contract one level down
SIDECAR_DEPTH = CONTRACT_DEPTH + 4
SIDECAR_CHARS = 4 << 20
#: a training state's metadata (config, optimiser groups, RNG states of every rank)
STATE_DEPTH = 64

MAX_STRIDE = 4096
MAX_DIM = 1 << 20
MAX_NAME = 512
MAX_ABS_NORM = 1e3  # |mean| and std bound: normalisation of [0, 1] RGB values
MIN_STD = 1e-8
MAX_ARCH_INT = 1 << 31
MAX_ARCH_ITEMS = 10_000
MAX_PROFILE_DIM = 1 << 16
PRECISIONS = ("fp32", "fp16", "int8")

# A JSON string literal (escapes included), removed before counting brackets so that "[[[" in a name is not depth.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def json_depth(text: str, limit: int) -> int:
    """The bracket nesting depth of JSON ``text``, counted without recursion; stops at ``limit + 1``."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        depth += 1 if ch in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def loads_bounded(text: str | bytes, what: str, *, max_depth: int, max_chars: int | None = None) -> Any:
    """``json.loads(text)`` for untrusted ``text``: DensekitError (one line naming ``what``) if it is not JSON,
    longer than ``max_chars`` or nested deeper than ``max_depth``. NaN/Infinity are refused (not JSON)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DensekitError(f"{what} is not UTF-8 text ({one_line(exc)})") from None
    if not isinstance(text, str):
        raise DensekitError(f"{what} must be JSON text, not {type(text).__name__}")
    if max_chars is not None and len(text) > max_chars:
        raise DensekitError(f"{what} is {len(text)} characters long (at most {max_chars} expected)")
    if json_depth(text, max_depth) > max_depth:
        raise DensekitError(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: only if the scan above missed a case
        raise DensekitError(f"{what} is not valid JSON ({one_line(exc)})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --------------------------------------------------------------------------------------------------
# Field checks: each returns the value in its canonical type or raises one line naming the field
# --------------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(raw: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """``raw[key]`` as an int in ``[lo, hi]`` (an integral float such as 8.0 is accepted, a bool is not)."""
    v = raw[key]
    if not _is_number(v) or (isinstance(v, float) and not (math.isfinite(v) and v.is_integer())):
        raise DensekitError(f"{key} must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise DensekitError(f"{key} must be in [{lo}, {hi}], got {_show(v)}")
    return int(v)


def check_str(raw: dict[str, Any], key: str, max_len: int = MAX_NAME, empty: bool = False) -> str:
    """``raw[key]`` as a one-line string of at most ``max_len`` characters."""
    v = raw[key]
    if not isinstance(v, str):
        raise DensekitError(f"{key} must be a string, got {_show(v)}")
    if len(v) > max_len or (not v and not empty) or _CONTROL.search(v):
        raise DensekitError(f"{key} must be a non-empty one-line string of at most {max_len} characters, got {_show(v)}")
    return v


def check_triple(raw: dict[str, Any], key: str, lo: float, hi: float) -> tuple[float, float, float]:
    """``raw[key]`` as 3 finite floats in ``[lo, hi]`` (per-channel mean or std)."""
    v = raw[key]
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_number(x) for x in v):
        raise DensekitError(f"{key} must be a list of 3 numbers, got {_show(v)}")
    if not all(math.isfinite(x) and lo <= x <= hi for x in v):
        raise DensekitError(f"{key} values must be finite and in [{lo:g}, {hi:g}], got {_show(v)}")
    return (float(v[0]), float(v[1]), float(v[2]))


def check_plain(value: Any, key: str, max_depth: int) -> None:
    """``value`` is plain data: str, finite number, bool, null, lists and string-keyed objects, at most
    ``max_depth`` levels and :data:`MAX_ARCH_ITEMS` items (checked with a stack, no recursion)."""
    stack, seen = [(value, 0)], 0
    while stack:
        v, depth = stack.pop()
        seen += 1
        if depth > max_depth or seen > MAX_ARCH_ITEMS:
            raise DensekitError(f"{key} is nested deeper than {max_depth} levels or holds over {MAX_ARCH_ITEMS} items")
        if isinstance(v, dict):
            if not all(isinstance(k, str) and len(k) <= MAX_NAME for k in v):
                raise DensekitError(f"{key} has a key that is not a short string")
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif _is_number(v):
            if not math.isfinite(v) or abs(v) > MAX_ARCH_INT:
                raise DensekitError(f"{key} holds the number {_show(v)} (finite, at most {MAX_ARCH_INT} expected)")
        elif not (v is None or isinstance(v, (str, bool))):
            raise DensekitError(f"{key} holds a {type(v).__name__}, not JSON data")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------
# The model contract and the engine sidecar
# --------------------------------------------------------------------------------------------------

CONTRACT_REQUIRED = ("name", "stride", "dim")


def check_contract(raw: Any) -> dict[str, Any]:
    """The keyword arguments of :class:`~densekit.serve.contract.ModelMeta` from a parsed contract.

    Required: name (str), stride (1..4096), dim (1..2**20). Optional: mean (3 finite numbers), std (3 positive),
    input_multiple (1..4096), objective and version (str), arch (an object of plain JSON data whose ``family``,
    if given, is a string). Unknown keys are ignored (a newer densekit may add some).
    """
    if not isinstance(raw, dict):
        raise DensekitError(f"model metadata must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in CONTRACT_REQUIRED if k not in raw]
    if missing:
        raise DensekitError(f"model metadata lacks {', '.join(missing)}")
    out: dict[str, Any] = {
        "name": check_str(raw, "name"),
        "stride": check_int(raw, "stride", 1, MAX_STRIDE),
        "dim": check_int(raw, "dim", 1, MAX_DIM),
    }
    if "mean" in raw:
        out["mean"] = check_triple(raw, "mean", -MAX_ABS_NORM, MAX_ABS_NORM)
    if "std" in raw:
        out["std"] = check_triple(raw, "std", MIN_STD, MAX_ABS_NORM)
    if "input_multiple" in raw:
        out["input_multiple"] = check_int(raw, "input_multiple", 1, MAX_STRIDE)
    for key in ("objective", "version"):
        if key in raw:
            out[key] = check_str(raw, key)
    if "arch" in raw:
        arch = raw["arch"]
        if not isinstance(arch, dict):
            raise DensekitError(f"arch must be a JSON object, got {_show(arch)}")
        check_plain(arch, "arch", CONTRACT_DEPTH - 2)
        if "family" in arch:
            check_str({"arch.family": arch["family"]}, "arch.family")
        out["arch"] = arch
    return out


def check_sidecar(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of an engine sidecar (after its ``format`` was checked) in canonical types; ``densekit``
    (the contract) is returned as is, for :func:`check_contract`. ``device`` and unknown keys must be plain data.
    """
    missing = [k for k in ("densekit", "tensorrt_version", "precision", "input_name", "output_name", "profile")
               if k not in raw]
    if missing:
        raise DensekitError(f"incomplete engine sidecar (missing {', '.join(missing)})")
    precision = check_str(raw, "precision")
    if precision not in PRECISIONS:
        raise DensekitError(f"precision must be one of {', '.join(PRECISIONS)}, got {_show(precision)}")
    profile = raw["profile"]
    if not isinstance(profile, dict):
        raise DensekitError(f"profile must be an object with min, opt and max shapes, got {_show(profile)}")
    shapes: dict[str, list[int]] = {}
    for key in ("min", "opt", "max"):
        shape = profile.get(key)
        if not isinstance(shape, list) or len(shape) != 4:
            raise DensekitError(f"profile.{key} must be a (B, 3, H, W) shape, got {_show(shape)}")
        shapes[key] = [check_int({f"profile.{key}": d}, f"profile.{key}", 1, MAX_PROFILE_DIM) for d in shape]
    device = raw.get("device") or {}
    if not isinstance(device, dict):
        raise DensekitError(f"device must be a JSON object, got {_show(device)}")
    check_plain(raw, "engine sidecar", SIDECAR_DEPTH)
    return {
        "densekit": raw["densekit"],
        "tensorrt_version": check_str(raw, "tensorrt_version", 64),
        "precision": precision,
        "input_name": check_str(raw, "input_name"),
        "output_name": check_str(raw, "output_name"),
        "profile": shapes,
        "device": dict(device),
    }
