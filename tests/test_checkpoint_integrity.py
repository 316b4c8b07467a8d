"""Checked checkpoints (issue 15): a SHA-256 in the metadata of every densekit safetensors file (the backbone
checkpoint and the training state), verified on load, so a flipped bit is one line and ``--resume`` refuses it;
files from before the checksum still load; ``log.jsonl`` has each step once after a resume; temporary files a
killed run left are removed; DataLoader workers end with the trainer; bad ``--backbone``/``--out`` are one line.
"""

from __future__ import annotations

import json
import multiprocessing
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from densekit.apps.cli import main
from densekit.serve.backbones import build_backbone
from densekit.serve.checkpoint import DIGEST_KEY, load_checkpoint, save_checkpoint, verify_digest
from densekit.serve.errors import DensekitError

from test_trainer import Kill, TinyDense, _cfg, _kill_at, _weights, tiny_backbone_bn  # noqa: F401 - sample fixture
from test_trainer import sample  # noqa: F401  (module-scoped fixture)


def _flip_bit(path: Path, where: str = "data", bit: int = 3) -> None:
    """Flip one bit in the tensor bytes (``data``, the middle of them) or in the JSON header (``header``)."""
    raw = bytearray(path.read_bytes())
    size = struct.unpack("<Q", raw[:8])[0]
    if where == "data":
        pos = 8 + size + (len(raw) - 8 - size) // 2
    else:  # a digit of a metadata value: the file stays valid safetensors and valid JSON
        pos = raw.index(b"train_steps", 8) + len(b'train_steps":"')
    raw[pos] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def test_a_checkpoint_carries_its_digest_and_a_flipped_bit_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(build_backbone("resnet18"), path, extra_meta={"train_steps": 1234})
    digest = _metadata(path)[DIGEST_KEY]
    assert len(digest) == 64 and digest != "0" * 64  # the placeholder was replaced
    assert verify_digest(path) is True
    load_checkpoint(path)
    good = path.read_bytes()
    for where in ("data", "header"):
        path.write_bytes(good)
        _flip_bit(path, where)
        with pytest.raises(DensekitError, match="corrupt checkpoint") as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(DensekitError, match="reserved"):
        save_checkpoint(build_backbone("pixels"), tmp_path / "x.safetensors", extra_meta={DIGEST_KEY: "x"})


def test_a_checkpoint_without_a_digest_still_loads(tmp_path: Path) -> None:
    model = build_backbone("resnet18")
    old = tmp_path / "old.safetensors"  # what densekit wrote before the checksum existed
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old),
              metadata={"densekit": model.meta.to_json()})
    assert verify_digest(old) is False
    loaded = load_checkpoint(old)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_corrupt_checkpoint_through_the_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(build_backbone("resnet18"), path)
    _flip_bit(path)
    for argv in (["info", str(path)], ["export", "onnx", str(path), "--out", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "corrupt checkpoint" in err, err


def _log_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "step" in r]


def test_resume_refuses_a_flipped_bit_in_the_state(sample: Path, tmp_path: Path) -> None:  # noqa: F811
    from densekit.train.trainer import Trainer

    kw = {"objective_cls": TinyDense, "backbone_fn": tiny_backbone_bn}
    run = tmp_path / "run"
    with pytest.raises(Kill):
        Trainer(_cfg(sample, run), hooks=[_kill_at(5)], **kw).fit()
    state = run / "state.safetensors"
    assert verify_digest(state, "training state") is True
    good = state.read_bytes()
    _flip_bit(state)
    with pytest.raises(DensekitError, match="cannot resume: .*corrupt training state") as err:
        Trainer(_cfg(sample, run), resume=True, **kw).fit()
    assert "\n" not in str(err.value)
    # a state from before the checksum (no digest in its metadata) still resumes
    state.write_bytes(good)
    meta = {k: v for k, v in _metadata(state).items() if k != DIGEST_KEY}
    save_file(load_file(str(state)), str(state), metadata=meta)
    assert verify_digest(state) is False
    assert Trainer(_cfg(sample, run), resume=True, **kw).fit().step == 6


def test_log_has_each_step_once_and_stale_temporaries_are_removed(sample: Path, tmp_path: Path) -> None:  # noqa: F811
    from densekit.train.trainer import Trainer

    kw = {"objective_cls": TinyDense, "backbone_fn": tiny_backbone_bn}
    run = tmp_path / "run"
    with pytest.raises(Kill):  # killed after step 5: the state is step 4's, step 5 is logged and redone
        Trainer(_cfg(sample, run), hooks=[_kill_at(5)], **kw).fit()
    assert _log_steps(run) == [1, 2, 3, 4, 5]
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 0.')  # a line torn by the kill
    # what atomic_path leaves when the process dies mid-write
    stale = [run / ".state.safetensors.k1ll3d.safetensors", run / ".log.jsonl.x9y8z7.jsonl"]
    for p in stale:
        p.write_bytes(b"half")
    Trainer(_cfg(sample, run), resume=True, **kw).fit()
    assert _log_steps(run) == [1, 2, 3, 4, 5, 6]
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("fail", [False, True], ids=["finished", "exception"])
def test_dataloader_workers_end_with_the_trainer(sample: Path, tmp_path: Path, fail: bool) -> None:  # noqa: F811
    from densekit.train.trainer import Trainer

    hooks = [_kill_at(3)] if fail else []
    cfg = _cfg(sample, tmp_path / "run", "data.num_workers=2")
    if fail:
        with pytest.raises(Kill):
            Trainer(cfg, objective_cls=TinyDense, backbone_fn=tiny_backbone_bn, hooks=hooks).fit()
    else:
        Trainer(cfg, objective_cls=TinyDense, backbone_fn=tiny_backbone_bn).fit()
    assert multiprocessing.active_children() == []


def test_train_backbone_pickle_and_out_file_are_one_line(sample: Path, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"\x80\x04not really a pickle")
    taken = tmp_path / "a-file"
    taken.write_text("x")
    cases = [
        (["--objective", "densecl", "--backbone", str(pth), "--data", str(sample), "--out", str(tmp_path / "r")],
         "never unpickles .pth files"),
        (["--objective", "densecl", "--data", str(sample), "--out", str(taken)], "is an existing file"),
        (["--out", str(taken), "--resume"], "is an existing file"),
        (["--objective", "densecl", "--data", str(sample), "--out", str(taken / "run")], "is an existing file"),
    ]
    for args, words in cases:
        assert main(["train", *args, "max_steps=1", "tensorboard=false"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "r").exists()
