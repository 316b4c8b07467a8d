"""A Triton Inference Server model repository for an exported model.

Layout (Triton ``docs/user_guide/model_repository.md``)::

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx   (platform onnxruntime_onnx)   or   REPO/<name>/1/model.plan (tensorrt_plan)

``config.pbtxt`` (``model_configuration.md``): ``max_batch_size`` > 0, so ``dims`` leave out the batch
dimension; -1 marks the dynamic height and width; ``dynamic_batching`` lets Triton merge requests;
the densekit contract rides along as the string parameter ``densekit`` so a client can preprocess.
For a TensorRT plan, ``max_batch_size`` may not exceed the engine profile's max batch and fixed dims
come from the profile.

The written file is parsed back before we call it done: with ``tritonclient``'s generated
``model_config_pb2`` and protobuf's text format when tritonclient is installed (the exact schema Triton
uses), otherwise with :func:`parse_pbtxt`, a small parser of the protobuf text format.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.onnx_meta import ENGINE_SUFFIXES, META_KEY, read_engine_sidecar, read_onnx_meta

DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class TritonModel:
    path: Path
    config_path: Path
    model_file: Path
    config: dict[str, Any]
    parsed_with: str


def _io_spec(path: Path) -> tuple[str, ModelMeta, dict[str, Any]]:
    """(platform, meta, shapes) of an .onnx file or an engine."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx

        meta = read_onnx_meta(path)
        if meta is None:
            raise DensekitError(f"{path}: ONNX file without densekit metadata; export it with `densekit export onnx`")
        proto = onnx.load(str(path), load_external_data=False)

        def dims(value: Any) -> list[int]:
            return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

        ins, outs = dims(proto.graph.input[0]), dims(proto.graph.output[0])
        if len(ins) != 4 or len(outs) != 4:
            raise DensekitError(f"{path}: expected (B, 3, H, W) -> (B, D, h, w), got {ins} -> {outs}")
        return (
            "onnxruntime_onnx",
            meta,
            {
                "input_name": proto.graph.input[0].name,
                "output_name": proto.graph.output[0].name,
                "input_dims": ins[1:],
                "output_dims": [meta.dim, *outs[2:]],
                "max_batch": None,
            },
        )
    if suffix in ENGINE_SUFFIXES:
        info = read_engine_sidecar(path)
        lo, hi = info.profile["min"], info.profile["max"]
        hw = [lo[2], lo[3]] if lo[2:] == hi[2:] else [-1, -1]
        out_hw = [hw[0] // info.meta.stride, hw[1] // info.meta.stride] if hw[0] > 0 else [-1, -1]
        return (
            "tensorrt_plan",
            info.meta,
            {
                "input_name": info.input_name,
                "output_name": info.output_name,
                "input_dims": [3, *hw],
                "output_dims": [info.meta.dim, *out_hw],
                "max_batch": hi[0],
            },
        )
    raise DensekitError(f"{path}: export triton takes an .onnx file or a TensorRT .engine/.plan")


def _pb_string(text: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII as octal UTF-8 bytes)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def render_config(name: str, platform: str, max_batch: int, spec: dict[str, Any], meta: ModelMeta) -> str:
    """The config.pbtxt text."""

    def dims(values: list[int]) -> str:
        return "[ " + ", ".join(str(int(v)) for v in values) + " ]"

    lines = [
        f"name: {_pb_string(name)}",
        f'platform: "{platform}"',
        f"max_batch_size: {int(max_batch)}",
        "input [",
        "  {",
        f"    name: {_pb_string(spec['input_name'])}",
        "    data_type: TYPE_FP32",
        f"    dims: {dims(spec['input_dims'])}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_pb_string(spec['output_name'])}",
        "    data_type: TYPE_FP32",
        f"    dims: {dims(spec['output_dims'])}",
        "  }",
        "]",
        "dynamic_batching {",
        "  max_queue_delay_microseconds: 100",
        "}",
    ]
    if platform == "tensorrt_plan":
        lines += ["instance_group [", "  {", "    count: 1", "    kind: KIND_GPU", "  }", "]"]
    lines += [
        "parameters {",
        f"  key: {_pb_string(META_KEY)}",
        f"  value: {{ string_value: {_pb_string(meta.to_json())} }}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_triton_repo(
    model: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    *,
    max_batch: int | None = None,
    name: str | None = None,
    version: int = 1,
) -> TritonModel:
    """Write ``repo/<name>/{config.pbtxt, <version>/model.onnx|model.plan}`` and parse the config back."""
    src = Path(model)
    if not src.is_file():
        raise DensekitError(f"{src}: model file not found (export it first: densekit export onnx|trt)")
    platform, meta, spec = _io_spec(src)
    limit = spec["max_batch"]
    if max_batch is None:
        max_batch = min(DEFAULT_MAX_BATCH, limit) if limit else DEFAULT_MAX_BATCH
    if max_batch < 1:
        raise DensekitError("--max-batch must be at least 1")
    if limit and max_batch > limit:
        raise DensekitError(f"--max-batch {max_batch} exceeds the engine profile's max batch {limit}")
    if version < 1:
        raise DensekitError("the model version must be a positive integer")
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", src.stem)
    model_dir = Path(repo) / name
    filename = "model.onnx" if platform == "onnxruntime_onnx" else "model.plan"
    model_file = model_dir / str(version) / filename
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_file) as tmp:
        shutil.copyfile(src, tmp)
    text = render_config(name, platform, max_batch, spec, meta)
    config, parsed_with = parse_config(text)
    check_config(config, platform, max_batch, spec)
    config_path = model_dir / "config.pbtxt"
    write_text_atomic(config_path, text)
    return TritonModel(model_dir, config_path, model_file, config, parsed_with)


def parse_config(text: str) -> tuple[dict[str, Any], str]:
    """Parse config.pbtxt into a plain dict (repeated fields as lists); returns (dict, parser used)."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return _normalise(parse_pbtxt(text)), "densekit pbtxt parser"
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise DensekitError(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from None
    raw = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _normalise(raw), "tritonclient model_config_pb2"


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Both parsers' output in one shape: ints as ints, repeated messages as lists."""
    out = dict(raw)
    out["max_batch_size"] = int(_one(raw.get("max_batch_size", 0)))
    for key in ("input", "output"):
        items = raw.get(key, [])
        items = items if isinstance(items, list) else [items]
        out[key] = [
            {
                "name": _one(i["name"]),
                "data_type": _one(i["data_type"]),
                "dims": [int(d) for d in (i["dims"] if isinstance(i["dims"], list) else [i["dims"]])],
            }
            for i in items
        ]
    out["platform"] = _one(raw.get("platform", ""))
    out["name"] = _one(raw.get("name", ""))
    params = raw.get("parameters", {})
    if isinstance(params, list):  # the small parser keeps map entries as key/value messages
        params = {_one(p["key"]): _one(p["value"]) for p in params}
    out["parameters"] = {
        k: {f: _one(x) for f, x in _one(v).items()} if isinstance(_one(v), dict) else _one(v) for k, v in params.items()
    }
    return out


def _one(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def check_config(config: dict[str, Any], platform: str, max_batch: int, spec: dict[str, Any]) -> None:
    """What we meant to write is what parses back."""
    problems = []
    if config["platform"] != platform:
        problems.append(f"platform {config['platform']!r}")
    if config["max_batch_size"] != max_batch:
        problems.append(f"max_batch_size {config['max_batch_size']}")
    if [i["dims"] for i in config["input"]] != [list(spec["input_dims"])]:
        problems.append(f"input dims {[i['dims'] for i in config['input']]}")
    if [o["dims"] for o in config["output"]] != [list(spec["output_dims"])]:
        problems.append(f"output dims {[o['dims'] for o in config['output']]}")
    if "dynamic_batching" not in config:
        problems.append("no dynamic_batching")
    meta_param = config["parameters"].get(META_KEY)
    meta_text = meta_param.get("string_value") if isinstance(meta_param, dict) else None
    try:
        ModelMeta.from_json(_one(meta_text))
    except DensekitError:
        problems.append("densekit parameter")
    if problems:
        raise DensekitError(f"generated config.pbtxt does not read back as written: {', '.join(problems)}")


_TOKEN = re.compile(r'\s*(?:#[^\n]*\n\s*)*("(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+)')


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """A small protobuf text-format parser: every field maps to the list of its values.

    Handles what Triton configs use: ``key: scalar``, ``key { ... }``, ``key: { ... }``,
    ``key [ v, v ]`` / ``key: [ {..}, {..} ]``, strings with C escapes, ``#`` comments. Enum values
    (``TYPE_FP32``) stay strings, numbers become int/float.
    """
    tokens = _tokenize(text)
    pos, result = _parse_fields(tokens, 0, end=None)
    if pos != len(tokens):
        raise DensekitError(f"config.pbtxt: unexpected {tokens[pos]!r}")
    return result


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise DensekitError(f"config.pbtxt: cannot read {text[pos : pos + 20]!r}")
        if match.group(1) is None:
            break
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


def _parse_fields(tokens: list[str], pos: int, end: str | None) -> tuple[int, dict[str, list[Any]]]:
    fields: dict[str, list[Any]] = {}
    while pos < len(tokens) and tokens[pos] != end:
        key = tokens[pos]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise DensekitError(f"config.pbtxt: expected a field name, got {key!r}")
        pos += 1
        if pos < len(tokens) and tokens[pos] == ":":
            pos += 1
        pos, values = _parse_value(tokens, pos)
        fields.setdefault(key, []).extend(values)
        if pos < len(tokens) and tokens[pos] in (",", ";"):
            pos += 1
    if end is not None:
        if pos >= len(tokens):
            raise DensekitError(f"config.pbtxt: missing {end!r}")
        pos += 1
    return pos, fields


def _parse_value(tokens: list[str], pos: int) -> tuple[int, list[Any]]:
    if pos >= len(tokens):
        raise DensekitError("config.pbtxt: value expected at end of file")
    tok = tokens[pos]
    if tok == "{":
        pos, msg = _parse_fields(tokens, pos + 1, end="}")
        return pos, [msg]
    if tok == "[":
        pos += 1
        values: list[Any] = []
        while pos < len(tokens) and tokens[pos] != "]":
            pos, vals = _parse_value(tokens, pos)
            values.extend(vals)
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        if pos >= len(tokens):
            raise DensekitError("config.pbtxt: missing ']'")
        return pos + 1, values
    return pos + 1, [_scalar(tok)]


def _scalar(tok: str) -> Any:
    if tok.startswith('"'):
        body = tok[1:-1]
        raw = re.sub(
            r"\\([0-7]{3}|.)",
            lambda m: (
                chr(int(m.group(1), 8))
                if len(m.group(1)) == 3
                else {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1))
            ),
            body,
        )
        return raw.encode("latin-1").decode("utf-8")
    for cast in (int, float):
        try:
            return cast(tok)
        except ValueError:
            pass
    return tok
