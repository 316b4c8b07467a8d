"""Will TensorRT's ONNX parser take this graph? A check that runs on any machine.

The data is onnx-tensorrt's published operator support matrix (``docs/operators.md``, "TensorRT 10.15
supports operators in the inclusive range of opset 9 to opset 24"), kept as
``onnx_tensorrt_ops.json`` beside this module with its version. A graph passes when

* its default-domain (``""``/``ai.onnx``) opset lies in the documented range,
* every default-domain node (subgraphs and model-local functions included) is an operator the table
  marks supported, and exists in ONNX at the model's opset (``onnx.defs.get_schema``),
* the restrictions of that table that are attribute checks hold (e.g. ``Resize``: modes nearest/linear
  only, "Antialiasing is not supported"; pooling: ``dilations`` all ones),
* no node is in another domain (``com.microsoft`` contrib ops, custom ops): TensorRT needs a plugin.

It is a parser-level check: an engine build can still fail later (shapes, memory), but an op that is
not in this table is certain to fail, and naming it before a GPU is involved saves a build.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from densekit.serve.errors import DensekitError

DATA_FILE = "onnx_tensorrt_ops.json"
DEFAULT_DOMAINS = ("", "ai.onnx")

# Attribute restrictions of the table, as checks: op -> attribute -> (allowed values, default).
# Quoted from the Restrictions column of docs/operators.md.
ATTRIBUTE_RULES: dict[str, dict[str, tuple[tuple[Any, ...], Any]]] = {
    "Resize": {
        "mode": (("nearest", "linear"), "nearest"),
        "antialias": ((0,), 0),
        "coordinate_transformation_mode": (
            ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"),
            "half_pixel",
        ),
        "nearest_mode": (("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"), "round_prefer_floor"),
        "keep_aspect_ratio_policy": (("stretch",), "stretch"),
    },
    "ScatterND": {"reduction": (("none",), "none")},
    "TopK": {"sorted": ((1,), 1)},
    "LSTM": {"input_forget": ((0,), 0), "layout": ((0,), 0)},
}
ALL_ONES_ATTRS = {"AveragePool": "dilations", "MaxPool": "dilations", "LpPool": "dilations"}


@dataclass(frozen=True)
class OpIssue:
    """One reason the parser will refuse the graph."""

    op: str
    node: str
    reason: str

    def describe(self) -> str:
        where = f" (node {self.node!r})" if self.node else ""
        return f"{self.op}{where}: {self.reason}"


@dataclass(frozen=True)
class CompatReport:
    tensorrt_version: str
    opset: int
    ops: tuple[str, ...]
    issues: tuple[OpIssue, ...]

    @property
    def ok(self) -> bool:
        return not self.issues


@lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    """The parsed data file: ``{"tensorrt_version", "opset_min", "opset_max", "operators": {...}}``."""
    text = resources.files("densekit.export").joinpath(DATA_FILE).read_text(encoding="utf-8")
    table = json.loads(text)
    for key in ("tensorrt_version", "opset_min", "opset_max", "operators", "source"):
        if key not in table:
            raise RuntimeError(f"{DATA_FILE} lacks {key!r}")
    return table


def _default_opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise DensekitError("the ONNX model imports no default-domain (ai.onnx) opset")


def _iter_nodes(graph: Any) -> Any:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def check_tensorrt_compat(model: Any) -> CompatReport:
    """Check an ONNX ``ModelProto`` or file path against onnx-tensorrt's operator list."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise DensekitError(f"{path}: ONNX file not found")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise DensekitError(f"{path}: not a valid ONNX file ({' '.join(str(exc).split())[:200]})") from None
    table = support_table()
    operators: dict[str, dict[str, Any]] = table["operators"]
    opset = _default_opset(model)
    issues: list[OpIssue] = []
    if not table["opset_min"] <= opset <= table["opset_max"]:
        issues.append(
            OpIssue("opset", "", f"opset {opset} outside TensorRT's {table['opset_min']}..{table['opset_max']}")
        )
    local_functions = {(f.domain, f.name) for f in model.functions}
    nodes = list(_iter_nodes(model.graph))
    for func in model.functions:
        nodes.extend(_iter_nodes(func))
    seen: set[str] = set()
    for node in nodes:
        if (node.domain, node.op_type) in local_functions:
            continue  # its body is checked above
        if node.domain not in DEFAULT_DOMAINS:
            issues.append(
                OpIssue(
                    f"{node.domain}::{node.op_type}",
                    node.name,
                    f"domain {node.domain!r} is not ONNX's; TensorRT needs a plugin for it",
                )
            )
            continue
        op = node.op_type
        seen.add(op)
        entry = operators.get(op)
        if entry is None:
            issues.append(OpIssue(op, node.name, "not in onnx-tensorrt's operator list"))
            continue
        if not entry["supported"]:
            issues.append(OpIssue(op, node.name, "not supported by TensorRT's ONNX parser"))
            continue
        try:
            onnx.defs.get_schema(op, opset, "")
        except Exception:
            issues.append(OpIssue(op, node.name, f"not an ONNX operator at opset {opset}"))
            continue
        issues.extend(_attribute_issues(node))
    return CompatReport(table["tensorrt_version"], opset, tuple(sorted(seen)), tuple(_dedupe(issues)))


def _attribute_issues(node: Any) -> list[OpIssue]:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    issues = []
    for name, (allowed, default) in ATTRIBUTE_RULES.get(node.op_type, {}).items():
        value = attrs.get(name, default)
        if value not in allowed:
            issues.append(
                OpIssue(
                    node.op_type,
                    node.name,
                    f"{name}={value!r} unsupported (TensorRT takes {', '.join(map(str, allowed))})",
                )
            )
    name = ALL_ONES_ATTRS.get(node.op_type)
    if name and name in attrs and any(int(v) != 1 for v in attrs[name]):
        issues.append(OpIssue(node.op_type, node.name, f"{name} must be all ones"))
    return issues


def _dedupe(issues: list[OpIssue]) -> list[OpIssue]:
    """One issue per (op, reason): a ViT has many identical nodes."""
    out, seen = [], set()
    for issue in issues:
        key = (issue.op, issue.reason)
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out


def require_tensorrt_compat(model: Any, source: str) -> CompatReport:
    """:func:`check_tensorrt_compat`, raising one DensekitError that names every offending op."""
    report = check_tensorrt_compat(model)
    if not report.ok:
        raise DensekitError(
            f"{source}: TensorRT {report.tensorrt_version}'s ONNX parser does not support "
            + "; ".join(i.describe() for i in report.issues)
        )
    return report
