"""Every command of the CLI answers bad input with one ``error:`` line and exit code 2, never a traceback.

The commands are enumerated from the typer app itself (so a new command is covered without editing this
file), and each is driven with: every numeric option given a non-number, every option with a minimum given
a number below it, an unknown option, and every path (and every required name that may be a path) set to
a path below a regular file, which is missing when read and unwritable when written.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import typer
import typer.main
from PIL import Image

from densekit.apps.cli import app, main


@dataclass(frozen=True)
class Param:
    name: str
    flag: str | None  # None for a positional argument
    kind: type | None  # int, float, str, Path, bool; None for anything else (lists)
    required: bool
    min: float | None


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], typing.Callable]]:
    found = []
    for command in group.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        found.append(((*prefix, name), command.callback))
    for sub in group.registered_groups:
        found += _commands(sub.typer_instance, (*prefix, sub.name))
    return found


def _base(annotation: object) -> type | None:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:  # Optional[X], X | None
        annotation = args[0]
    return annotation if annotation in (int, float, str, bool, Path) else None


def _params(callback: typing.Callable) -> list[Param]:
    hints = typing.get_type_hints(callback, include_extras=True)
    params = []
    for name, sig in inspect.signature(callback).parameters.items():
        annotated = hints[name]
        base, *extras = typing.get_args(annotated)
        info = next(e for e in extras if isinstance(e, typer.models.ParameterInfo))
        flag = None
        if isinstance(info, typer.models.OptionInfo):
            decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
            flag = decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
        params.append(Param(name, flag, _base(base), sig.default is inspect.Parameter.empty, info.min))
    return params


COMMANDS = {path: _params(callback) for path, callback in _commands(app)}


def test_the_enumeration_sees_every_command_click_sees() -> None:
    def walk(command, path=()):
        subs = getattr(command, "commands", None)
        if not subs:
            return {path}
        return set().union(*(walk(c, (*path, n)) for n, c in subs.items()))

    assert set(COMMANDS) == walk(typer.main.get_command(app))
    assert len(COMMANDS) >= 14  # track, info, train, serve, app, demo, data sample, eval x2, export x3, index x2


def _path_like(p: Param) -> bool:
    return p.kind is Path or (p.required and p.kind is str)  # a required name may be a checkpoint path


def _argv(path: tuple[str, ...], params: list[Param], bad_path: Path, **values: str) -> list[str]:
    """``path`` with its required parameters filled: ``values[name]``, else ``bad_path`` for paths.

    Optional paths get ``bad_path`` too when the command has no required one (train, demo, app).
    """
    argv = list(path)
    all_paths = not any(p.required and _path_like(p) for p in params)
    for p in params:
        if p.name in values:
            value = values[p.name]
        elif _path_like(p) and (p.required or all_paths):
            value = str(bad_path / f"{p.name}.safetensors" if p.kind is str else bad_path / p.name)
        elif p.required:
            value = str(p.min if p.min is not None else 1)
        else:
            continue
        argv += [value] if p.flag is None else [p.flag, value]
    return argv


def _bad_values(params: list[Param]) -> list[tuple[Param, str]]:
    cases = []
    for p in params:
        if p.kind in (int, float):
            cases.append((p, "abc"))
        if p.min is not None:
            below = p.min - 1 if p.kind is int else p.min - max(abs(p.min), 1e-3)
            cases.append((p, str(int(below) if p.kind is int else below)))
    return cases


@pytest.fixture()
def bad_path(tmp_path: Path) -> Path:
    regular = tmp_path / "a-file"
    regular.write_text("not a folder")
    return regular / "below"


def _check_one_error_line(argv: list[str], capsys) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    lines = text.splitlines()
    assert rc == 2, f"densekit {' '.join(argv)}: exit {rc}\n{text}"
    assert "Traceback" not in text, text
    assert 1 <= len(lines) <= 3, f"densekit {' '.join(argv)}: {len(lines)} lines\n{text}"
    assert [line for line in lines if line.startswith("error: ")], text
    return text


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_bad_option_values_are_one_error_line(path: tuple[str, ...], bad_path: Path, capsys) -> None:
    params = COMMANDS[path]
    for param, value in _bad_values(params):
        text = _check_one_error_line(_argv(path, params, bad_path, **{param.name: value}), capsys)
        assert param.flag in text, text  # the message is about the option that was wrong
    text = _check_one_error_line(_argv(path, params, bad_path) + ["--no-such-option"], capsys)
    assert "--no-such-option" in text


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_missing_or_unwritable_paths_are_one_error_line(path: tuple[str, ...], bad_path: Path, capsys) -> None:
    params = COMMANDS[path]
    assert any(_path_like(p) for p in params), "a command without paths"
    _check_one_error_line(_argv(path, params, bad_path), capsys)


def test_a_missing_required_option_is_one_error_line(capsys) -> None:
    text = _check_one_error_line(["data", "sample"], capsys)
    assert "densekit data sample --help" in text


def test_an_unexpected_exception_is_one_line_with_exit_code_1(monkeypatch, capsys) -> None:
    from densekit.apps.cli import _unexpected

    try:
        1 / 0
    except ZeroDivisionError as exc:  # what a bug in a command body would raise
        assert _unexpected(exc) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: unexpected ZeroDivisionError: division by zero") and "\n" not in err
        monkeypatch.setenv("DENSEKIT_DEBUG", "1")
        with pytest.raises(ZeroDivisionError):
            _unexpected(exc)


def test_a_missing_optional_extra_names_the_extra() -> None:
    from densekit.apps.cli import _extra_providing

    assert _extra_providing("gradio") == "app"
    assert _extra_providing("pymilvus") == "milvus"
    assert _extra_providing("tensorrt") == "trt"
    assert _extra_providing("numpy") is None  # a core dependency: a broken install, not an extra


def test_unwritable_outputs_are_one_error_line(bad_path: Path, tmp_path: Path, capsys) -> None:
    """Valid input, an output below a regular file: the command runs until it writes, then one line."""
    from densekit.serve.imageio import write_mask

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(frames / f"{i:05d}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 8:24] = 1
    write_mask(tmp_path / "mask.png", mask)
    text = _check_one_error_line(["track", str(frames), "--mask", str(tmp_path / "mask.png"), "--out",
                                  str(bad_path), "--backbone", "pixels"], capsys)
    assert str(bad_path) in text
    text = _check_one_error_line(["export", "onnx", "pixels", "--out", str(bad_path / "m.onnx")], capsys)
    assert str(bad_path) in text


def test_preset_help_names_every_preset_with_its_settings() -> None:
    from densekit.apps.cli import PRESET_HELP
    from densekit.retrieval.propagation import PRESETS

    for name, cfg in PRESETS.items():
        assert f"{name} (n={cfg.n_last}, k={cfg.topk}, T={cfg.temperature:g}, " in PRESET_HELP, name
        size = "native size" if cfg.resize == "native" else f"{cfg.short_side} short side"
        assert size in PRESET_HELP.split(f"{name} (")[1].split(")")[0], name


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_missing_extra_is_one_line_naming_it() -> None:
    # None in sys.modules is how Python itself refuses an import: gradio behaves as if not installed
    out = _python("import sys; sys.modules['gradio'] = None\n"
                  "from densekit.apps.cli import main; sys.exit(main(['app', '--model', 'pixels']))")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: this needs gradio, which is not installed: pip install 'densekit[app]'"


def test_a_command_module_that_cannot_be_imported_is_said_not_skipped() -> None:
    out = _python("import sys; sys.modules['densekit.apps.cmd_serve'] = None\nimport densekit.apps.cli")
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: densekit is installed incompletely (") and "cmd_serve" in line


def test_plain_click_usage_errors_are_one_line_too(capsys) -> None:
    """Typers that use click itself (not a vendored copy) raise click's own exceptions: same contract."""
    click = pytest.importorskip("click")
    from densekit.apps.cli import _unexpected

    assert _unexpected(click.BadParameter("must be a number", param_hint="'--k'")) == 2
    assert capsys.readouterr().err == "error: Invalid value for '--k': must be a number\n"


# --------------------------------------------------------------------------------------------------
# densekit train: settings an objective cannot train with are refused before the first step
# --------------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"

# (id, train arguments after --data/--out, words the line must hold)
TRAIN_CASES = [
    *[(f"{name}-on-a-cnn", ["--objective", name, "--backbone", "resnet18"], ["timm ViT", "resnet18"])
      for name in ("cribo", "selfpatch", "droppos")],  # the ViT-only objectives (DetCon runs on both)
    ("cribo-grid-too-small-for-the-clusters", ["--config", str(CONFIGS / "cribo_vit_tiny.yaml"), "hparams.n_tokens=200"],
     ["8x8 patch grid", "n_tokens=200"]),
    ("detcon-grid-too-small-for-the-masks", ["--config", str(CONFIGS / "detcon_vit_tiny.yaml"), "hparams.num_masks=100"],
     ["num_masks=100", "8x8 feature grid"]),
    # size 0 = the frame's size, known only in the transform: refused from the loader, still before a step
    ("detcon-frame-too-small-for-the-masks", ["--config", str(CONFIGS / "detcon_resnet18.yaml"), "hparams.size=0",
                                              "data.size=[24,32]"], ["num_masks=16", "3x4 feature grid"]),
    ("droppos-image-longer-than-the-sequence", ["--config", str(CONFIGS / "droppos_vit_tiny.yaml"),
                                                "hparams.seq_len=10"], ["hparams.seq_len=10", "packed sequence"]),
    ("droppos-full-image-longer-than-the-sequence", ["--config", str(CONFIGS / "droppos_vit_tiny.yaml"),
                                                     "hparams.native=true", "hparams.full_seq_len=30"],
     ["hparams.full_seq_len=30", "packed sequence"]),
    ("cribo-bank-larger-than-the-data", ["--config", str(CONFIGS / "cribo_vit_tiny.yaml"), "hparams.queue_size=64"],
     ["queue_size=64", "12 training images"]),
    # a pretrained start that does not fit the objective (issue 13)
    ("hiergroup-on-a-vit", ["--objective", "hiergroup", "--backbone", "timm:vit_tiny_patch16_224",
                            "backbone_kwargs.depth=1", "backbone_kwargs.img_size=64"], ["multi-stage CNN", "1 stage"]),
    ("poodle-decoder-on-lite0", ["--objective", "poodle", "--backbone", "efficientnet_lite0"],
     ["decoder=True", "efficientnet_lite0"]),
    ("freeze-leaves-nothing-to-train", ["--objective", "densecl", "--backbone", "efficientnet_lite0",
                                        "finetune.freeze_until=blocks.3"], ["freezes every stage"]),
]


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    # 2 videos x 6 frames = 12 training images
    return make_sample(tmp_path_factory.mktemp("videos") / "s", sequences=2, frames=6, height=64, width=80, seed=0)


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_settings_an_objective_cannot_use_are_one_error_line(
        args: list[str], words: list[str], tiny_videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_videos), "--out", str(out), *args, "max_steps=2", "batch_size=2",
            "data.num_workers=1", "tensorboard=false"]
    text = _check_one_error_line(argv, capsys)
    (line,) = [x for x in text.splitlines() if x.startswith("error: ")]
    assert all(w in line for w in words), line
    # before any training step: no state saved, no step logged
    assert not (out / "state.safetensors").exists()
    log = out / "log.jsonl"
    assert not log.exists() or '"step"' not in log.read_text(), log.read_text()


def test_train_eval_hook_on_a_root_without_masks_is_one_line_before_training(tiny_videos: Path, tmp_path: Path,
                                                                           capsys) -> None:
    import shutil

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tiny_videos / "JPEGImages", unlabelled / "JPEGImages")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_videos), "--out", str(out), "--objective", "densecl", "--backbone",
            "resnet18", "max_steps=2", "batch_size=2", "data.size=[64,64]", "data.num_workers=0",
            "tensorboard=false", f"eval.davis={unlabelled}"]
    text = _check_one_error_line(argv, capsys)
    assert f"eval.davis={unlabelled}" in text and "no annotation for its first frame" in text, text
    assert not out.exists() or not (out / "state.safetensors").exists()
