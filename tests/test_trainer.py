"""Trainer tests: exact resume, config round trip, bad input, the ``densekit train`` CLI end to end.

The trainer is exercised with :class:`TinyDense`, a small objective defined here (so the trainer does not
depend on the real objectives): a dense cosine consistency loss between the student's view of frame t and an
EMA teacher's view of frame t+d, plus a global InfoNCE whose negatives are the other samples of the GLOBAL batch
(via ``gather_with_grad``) and a queue of past teacher keys (pushed with ``concat_all_gather``). Its forward also
draws torch random numbers (position dropout), so exact resume must restore the torch RNG to pass.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.contract import IMAGENET_MEAN, IMAGENET_STD, ModelMeta
from densekit.serve.errors import DensekitError
from densekit.train import dist
from densekit.train.config import build_config, dump_yaml, from_dict, TrainConfig
from densekit.train.objective import Objective

# --------------------------------------------------------------------------------------------------
# A tiny objective and backbone (also used by test_ddp.py)
# --------------------------------------------------------------------------------------------------


class TinyTransform:
    """frames [t, t+d] (H,W,3) uint8 -> view1/view2 (3,H,W) float32 normalised; same flip, own brightness."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        flip = bool(rng.random() < 0.5)
        out = {}
        for i, f in enumerate([frames[0], frames[-1]]):
            x = f.astype(np.float32).transpose(2, 0, 1) / 255.0
            if flip:
                x = x[:, :, ::-1]
            x = np.clip(x * rng.uniform(0.8, 1.2), 0, 1)
            out[f"view{i + 1}"] = np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)
        return out


class TinyDense(Objective):
    """Dense consistency + global InfoNCE with gathered negatives, an EMA teacher and a key queue.

    batch: view1, view2 (B,3,H,W). Student features (B,D,h,w) -> 1x1 head -> (B,E,h,w).
    """

    name = "tinydense"
    data = "pairs"

    def __init__(self, backbone: DenseBackbone, dim: int = 16, queue: int = 32, momentum: float = 0.9,
                 temperature: float = 0.2, drop: float = 0.25) -> None:
        super().__init__(backbone, dim=dim, queue=queue, momentum=momentum, temperature=temperature, drop=drop)
        self.head = nn.Conv2d(backbone.meta.dim, dim, 1)
        self.teacher = copy.deepcopy(nn.ModuleDict({"backbone": backbone, "head": self.head}))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.momentum, self.temperature, self.drop = momentum, temperature, drop
        self._keys: torch.Tensor | None = None

    def transform(self) -> Callable[[list[np.ndarray], np.random.Generator], dict[str, np.ndarray]]:
        return TinyTransform(self.backbone.meta.mean, self.backbone.meta.std)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = F.normalize(self.head(self.backbone(batch["view1"])), dim=1)  # (B,E,h,w)
        with torch.no_grad():
            t = F.normalize(self.teacher["head"](self.teacher["backbone"](batch["view2"])), dim=1)
        keep = (torch.rand(s.shape[0], 1, *s.shape[2:], device=s.device) >= self.drop).float()  # torch RNG
        dense = ((1 - (s * t).sum(1, keepdim=True)) * keep).sum() / keep.sum().clamp_min(1)
        q = F.normalize(s.mean((2, 3)), dim=1)  # (B,E)
        k = F.normalize(t.mean((2, 3)), dim=1)
        q_all = dist.gather_with_grad(q)  # (world*B, E) negatives across processes
        b = q.shape[0]
        off = dist.rank() * b if q_all.shape[0] != b else 0  # this rank's rows in the gathered batch
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ q_all.t()
        self_mask = torch.zeros_like(neg, dtype=torch.bool)
        self_mask[torch.arange(b), off + torch.arange(b)] = True  # an anchor is not its own negative
        neg = neg.masked_fill(self_mask, float("-inf"))
        logits = torch.cat([pos, neg, q @ self.queue.t()], 1) / self.temperature
        contrast = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=q.device))
        self._keys = k.detach()
        return {"loss": dense + contrast, "dense": dense.detach(), "contrast": contrast.detach(),
                "std": s.detach().std(0).mean()}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        student = nn.ModuleDict({"backbone": self.backbone, "head": self.head})
        for pt, ps in zip(self.teacher.parameters(), student.parameters()):
            pt.mul_(self.momentum).add_(ps.detach(), alpha=1 - self.momentum)
        for bt, bs in zip(self.teacher.buffers(), student.buffers()):
            bt.copy_(bs)
        if self._keys is not None:
            keys = dist.concat_all_gather(self._keys)
            n = self.queue.shape[0]
            idx = (int(self.queue_ptr) + torch.arange(keys.shape[0], device=keys.device)) % n
            self.queue[idx] = keys
            self.queue_ptr.fill_((int(self.queue_ptr) + keys.shape[0]) % n)
            self._keys = None


def tiny_backbone(norm: bool = True, seed: int = 0) -> DenseBackbone:
    """A 3-conv stride-8 backbone; ``norm=False`` has no BatchNorm (per-process BN statistics would make
    DDP and single-process gradients differ by design, see test_ddp.py)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for w in (8, 16, 16):
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1)]
        if norm:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU())
        c = w
    meta = ModelMeta(name="tiny", stride=8, dim=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_multiple=8,
                     arch={"family": "tiny"})
    return DenseBackbone(nn.Sequential(*layers[:-1]), meta)


def tiny_backbone_bn(cfg: TrainConfig) -> DenseBackbone:
    return tiny_backbone(norm=True, seed=cfg.seed)


def tiny_backbone_nobn(cfg: TrainConfig) -> DenseBackbone:
    return tiny_backbone(norm=False, seed=cfg.seed)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample") / "s", sequences=3, frames=8, height=64, width=96, seed=0)


def _cfg(sample: Path, out: Path, *extra: str) -> TrainConfig:
    return build_config(
        overrides=["max_steps=6", "batch_size=4", "data.size=[32,32]", "data.gap_max=3", "data.num_workers=0",
                   "save_every=2", "log_every=1", "progress=false", "tensorboard=false", "deterministic=true",
                   "optim.warmup_steps=2", "optim.lr=0.01", *extra],
        objective="tinydense", backbone="resnet18", out=str(out), data_path=str(sample),
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run / "state.safetensors")).items() if k.startswith("model.")}


class Kill(Exception):
    """Simulates the process dying right after a given step."""


def _kill_at(k: int) -> Callable[[Any, int], None]:
    def hook(_trainer: Any, step: int) -> None:
        if step == k:
            raise Kill(step)

    return hook


# --------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"


@pytest.mark.parametrize(
    "backbone_fn,workers", [(None, 0), (tiny_backbone_bn, 2)], ids=["resnet18-inproc", "tiny-bn-2workers"]
)
def test_resume_after_kill_is_bit_identical(sample: Path, tmp_path: Path, backbone_fn, workers: int) -> None:
    from densekit.train.trainer import Trainer

    kw = {"objective_cls": TinyDense, "backbone_fn": backbone_fn}
    extra = [f"data.num_workers={workers}"]
    full = Trainer(_cfg(sample, tmp_path / "full", *extra), **kw).fit()
    assert full.step == 6 and not full.halted

    # Killed after step 5: the last checkpoint is step 4, steps 5-6 are redone after resuming.
    with pytest.raises(Kill):
        Trainer(_cfg(sample, tmp_path / "cut", *extra), hooks=[_kill_at(5)], **kw).fit()
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "cut" / "state.safetensors"), "pt").metadata()["densekit_train_state"])
    assert meta["step"] == 4
    resumed = Trainer(_cfg(sample, tmp_path / "cut", *extra), resume=True, **kw).fit()
    assert resumed.step == 6

    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    _assert_identical(a, b)
    # The run actually trained (weights moved away from the initial ones) and the queue was filled.
    assert any("queue" in k for k in a)
    assert int(a["model.queue_ptr"]) == (6 * 4) % 32


def test_resume_with_halt_at_and_changed_schedule_is_refused(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer

    kw = {"objective_cls": TinyDense, "backbone_fn": tiny_backbone_bn}
    full = Trainer(_cfg(sample, tmp_path / "full", "max_steps=5", "save_every=0"), **kw).fit()
    part = Trainer(_cfg(sample, tmp_path / "cut", "max_steps=5", "save_every=0", "halt_at=3"), **kw).fit()
    assert part.halted and part.step == 3
    assert not (tmp_path / "cut" / "backbone.safetensors").exists()
    with pytest.raises(DensekitError, match="optim.lr"):
        Trainer(_cfg(sample, tmp_path / "cut", "max_steps=5", "optim.lr=0.5"), resume=True, **kw).fit()
    done = Trainer(_cfg(sample, tmp_path / "cut", "max_steps=5", "save_every=0"), resume=True, **kw).fit()
    assert done.step == 5 and not done.halted
    _assert_identical(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


def test_different_seed_gives_different_weights(sample: Path, tmp_path: Path) -> None:
    """Guards the resume test against passing trivially (e.g. if training did not change anything)."""
    from densekit.train.trainer import Trainer

    kw = {"objective_cls": TinyDense, "backbone_fn": tiny_backbone_bn}
    Trainer(_cfg(sample, tmp_path / "a", "max_steps=3"), **kw).fit()
    Trainer(_cfg(sample, tmp_path / "b", "max_steps=3", "data.gap_min=2"), **kw).fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    init = tiny_backbone(norm=True, seed=0).state_dict()
    assert not torch.equal(a["model.backbone.body.0.weight"], init["body.0.weight"])
    assert not torch.equal(a["model.backbone.body.0.weight"], b["model.backbone.body.0.weight"])


# --------------------------------------------------------------------------------------------------
# Time budget
# --------------------------------------------------------------------------------------------------


def _records(run: Path, key: str) -> list[dict[str, Any]]:
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r]


def test_budget_calibration_leaves_no_trace_and_resume_is_exact(sample: Path, tmp_path: Path) -> None:
    """A budget far longer than max_steps: the schedule is max_steps, and the calibration steps (run, then
    undone) leave the run bit-identical to a plain one; a killed budget run resumes exactly, without calibrating
    again."""
    from densekit.train.trainer import Trainer

    kw = {"objective_cls": TinyDense, "backbone_fn": tiny_backbone_bn}
    plain = Trainer(_cfg(sample, tmp_path / "plain"), **kw).fit()
    budget = ["budget_s=3600", "max_steps=6"]
    full = Trainer(_cfg(sample, tmp_path / "full", *budget), **kw).fit()
    assert full.max_steps == 6 == full.step and not full.stopped_by_budget and full.seconds_per_step > 0
    (calib,) = _records(tmp_path / "full", "budget")
    assert calib["calibration_steps"] == 4 and calib["max_steps"] == 6 and calib["clock"] == "cpu"  # the default
    _assert_identical(_weights(tmp_path / "plain"), _weights(tmp_path / "full"))
    assert plain.metrics["loss"] == full.metrics["loss"]

    with pytest.raises(Kill):
        Trainer(_cfg(sample, tmp_path / "cut", *budget), hooks=[_kill_at(5)], **kw).fit()
    resumed = Trainer(_cfg(sample, tmp_path / "cut", *budget), resume=True, **kw).fit()
    assert resumed.step == 6 and resumed.seconds_per_step is None  # the saved schedule, no second calibration
    assert len(_records(tmp_path / "cut", "budget")) == 1
    _assert_identical(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


@pytest.mark.parametrize("clock,workers", [("wall", 0), ("cpu", 1)])
def test_budget_stops_within_budget_plus_one_step(sample: Path, tmp_path: Path, clock: str, workers: int) -> None:
    from safetensors import safe_open

    from densekit.train.budget import clock_fn
    from densekit.train.trainer import Trainer

    now = clock_fn(clock)
    times: list[float] = []
    budget_s = 2.0
    cfg = _cfg(sample, tmp_path / "run", f"budget_s={budget_s}", f"clock={clock}", "max_steps=100000",
               "save_every=0", "log_every=5", f"data.num_workers={workers}", "deterministic=false")
    t0 = now()
    res = Trainer(cfg, objective_cls=TinyDense, backbone_fn=tiny_backbone_bn,
                  hooks=[lambda _t, _s: times.append(now())]).fit()
    steps = np.diff([t0, *times])
    # the calibration sized the schedule to the budget (not a few steps, not the cap) ...
    assert 4 < res.max_steps < 100000 and res.step > 0
    # ... and the run ended within the budget plus one step (this clock started before fit's: an upper bound)
    assert times[-1] - t0 <= budget_s + steps[1:].max() + 0.1, (times[-1] - t0, steps.max())
    assert res.clock == clock and res.budget_s == budget_s and res.step == len(times)
    assert res.stopped_by_budget == (res.step < res.max_steps)
    (end,) = _records(tmp_path / "run", "end")
    assert end["clock"] == clock and end["seconds"] == res.seconds and end["step"] == res.step
    assert times[-1] - t0 - 0.1 <= res.seconds <= times[-1] - t0 + 5.0  # the saving and export come after
    with safe_open(str(tmp_path / "run" / "backbone.safetensors"), "pt") as fh:
        md = fh.metadata()
    assert json.loads(md["train_steps"]) == res.step and md["train_clock"] == clock
    assert json.loads(md["stopped_early"]) == res.stopped_by_budget
    with safe_open(str(tmp_path / "run" / "state.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["densekit_train_state"])
    assert meta["max_steps"] == res.max_steps and meta["step"] == res.step


def test_budget_replans_when_the_calibration_was_wrong(sample: Path, tmp_path: Path, monkeypatch) -> None:
    """A calibration 5x too pessimistic (a loaded machine while it timed its steps) would end the schedule at a
    fifth of the budget; the loop's own rate re-sizes it, so the run uses the budget (and says so in the log)."""
    from densekit.train.trainer import Trainer

    real = Trainer._calibrate
    monkeypatch.setattr(Trainer, "_calibrate", lambda self, run, ds: 5 * real(self, run, ds))
    budget_s = 3.0
    cfg = _cfg(sample, tmp_path / "run", f"budget_s={budget_s}", "max_steps=100000", "save_every=0",
               "log_every=5", "deterministic=false")
    res = Trainer(cfg, objective_cls=TinyDense, backbone_fn=tiny_backbone_bn).fit()
    (calib,) = _records(tmp_path / "run", "budget")
    replans = _records(tmp_path / "run", "replan")
    assert replans and replans[0]["max_steps"] > 2 * calib["max_steps"], (calib, replans)
    assert res.max_steps == replans[-1]["max_steps"] and res.step > 2 * calib["max_steps"]
    assert res.seconds >= 0.9 * budget_s, res.seconds


def test_budget_config_is_checked() -> None:
    with pytest.raises(DensekitError, match="budget_s"):
        build_config(overrides=["budget_s=-1"])
    with pytest.raises(DensekitError, match="clock"):
        build_config(overrides=["clock=gpu"])


# --------------------------------------------------------------------------------------------------
# Outputs, schedule, config
# --------------------------------------------------------------------------------------------------


def test_outputs_backbone_config_and_logs(sample: Path, tmp_path: Path) -> None:
    from densekit.serve.checkpoint import load_checkpoint
    from densekit.train.trainer import Trainer

    run = tmp_path / "run"
    res = Trainer(_cfg(sample, run, "max_steps=3", "tensorboard=true"), objective_cls=TinyDense).fit()
    bb = load_checkpoint(run / "backbone.safetensors")
    assert bb.meta.objective == "tinydense" and bb.meta.name == "resnet18"
    state = _weights(run)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, state[f"model.backbone.{k}"]), k
    cfg = build_config(run / "config.yaml")
    assert cfg.hparams == {"dim": 16, "queue": 32, "momentum": 0.9, "temperature": 0.2, "drop": 0.25}
    assert cfg.max_steps == 3 and cfg.data.size == [32, 32]
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    lines = [x for x in records if "step" in x]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(np.isfinite(x["loss"]) for x in lines) and res.images_per_s > 0
    assert records[-1]["end"]["clock"] == "cpu" and records[-1]["end"]["step"] == 3 == res.max_steps
    assert not res.stopped_by_budget and 0 < res.seconds
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())


def test_eval_hook_reports_jf_and_leaves_training_untouched(sample: Path, tmp_path: Path) -> None:
    from densekit.retrieval.backbone_eval import davis_jf_for_config
    from densekit.serve.davis import DavisRoot
    from densekit.train.trainer import Trainer

    seq = DavisRoot(sample).sequences("val")[0]
    kw = {"objective_cls": TinyDense, "backbone_fn": tiny_backbone_bn}
    res = Trainer(_cfg(sample, tmp_path / "ev", "max_steps=3", f"eval.davis={sample}", "eval.every=2",
                       f"eval.sequences=[{seq}]"), evaluator=davis_jf_for_config, **kw).fit()
    Trainer(_cfg(sample, tmp_path / "plain", "max_steps=3"), **kw).fit()
    assert [e["step"] for e in res.evals] == [2.0, 3.0]
    assert all(0.0 <= e["J&F"] <= 1.0 and e["J&F"] == pytest.approx((e["J"] + e["F"]) / 2) for e in res.evals)
    logged = [json.loads(x)["eval"] for x in (tmp_path / "ev" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(logged) == 2
    _assert_identical(_weights(tmp_path / "ev"), _weights(tmp_path / "plain"))


def test_lr_schedule_warmup_then_cosine() -> None:
    from densekit.train.trainer import lr_at

    cfg = build_config(overrides=["max_steps=110", "optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half-way through the cosine
    assert lrs[-1] > 0.1 and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_config_round_trip_and_overrides(tmp_path: Path) -> None:
    cfg = build_config(overrides=["optim.lr=3e-4", "data.size=96,128", "hparams.temperature=0.3",
                                  "eval.sequences=[a,b]", "decoder=true"], objective="x", out="r")
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.data.size == [96, 128]
    assert cfg.hparams == {"temperature": 0.3} and cfg.eval.sequences == ["a", "b"] and cfg.decoder is True
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    again = build_config(p)
    assert again == cfg
    # YAML file < overrides
    again2 = build_config(p, overrides=["optim.lr=1"])
    assert again2.optim.lr == 1.0 and again2.data.size == [96, 128]


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lr=abc", "optim.lr: expected float"),
        ("optim.lrr=1", "unknown config key"),
        ("data.size=[1,2,3]", "data.size"),
        ("max_steps=1.5", "max_steps: expected int"),
        ("progress=3", "progress: expected bool"),
        ("optim.name=lamb", "optim.name"),
        ("nonsense", "key=value"),
        ("batch_size=0", "batch_size"),
    ],
)
def test_bad_overrides_are_one_line(override: str, match: str) -> None:
    with pytest.raises(DensekitError, match=match) as err:
        build_config(overrides=[override])
    assert "\n" not in str(err.value)


def test_bad_yaml_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("optim: [unclosed\n")
    with pytest.raises(DensekitError, match="not valid YAML"):
        build_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(DensekitError, match="mapping"):
        build_config(p)
    with pytest.raises(DensekitError, match="not found"):
        build_config(tmp_path / "missing.yaml")


def test_from_dict_rejects_nested_unknown() -> None:
    with pytest.raises(DensekitError, match="data.foo"):
        from_dict(TrainConfig, {"data": {"foo": 1}})


# --------------------------------------------------------------------------------------------------
# Bad input through the trainer
# --------------------------------------------------------------------------------------------------


class NeedsDecoder(TinyDense):
    name = "needsdecoder"

    def __init__(self, backbone: DenseBackbone, **kw: Any) -> None:
        if not backbone.meta.arch.get("decoder"):
            raise ValueError("this objective needs a backbone with a decoder")
        super().__init__(backbone, **kw)


def test_bad_inputs_are_one_line(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer

    def run(*extra: str, data: Path | None = None, cls: type = TinyDense, resume: bool = False) -> str:
        cfg = _cfg(data or sample, tmp_path / "r", *extra)
        with pytest.raises(DensekitError) as err:
            Trainer(cfg, objective_cls=cls, backbone_fn=tiny_backbone_bn, resume=resume).fit()
        assert "\n" not in str(err.value)
        return str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no training data" in run(data=empty)
    assert "too short" in run("data.gap_min=8", "data.gap_max=9")
    assert "hyper-parameter" in run("hparams.bogus=1")
    assert "does not fit" in run(cls=NeedsDecoder)
    assert "cannot resume" in run(resume=True)
    with pytest.raises(DensekitError, match="unknown objective"):
        Trainer(_cfg(sample, tmp_path / "r"))


def test_unreadable_frame_in_worker_is_one_line(tmp_path: Path) -> None:
    """A frame whose header is fine but whose data is truncated fails inside a DataLoader worker."""
    from PIL import Image

    from densekit.train.trainer import Trainer

    vid = tmp_path / "frames" / "v"
    vid.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(vid / f"{i:05d}.png")
    raw = (vid / "00001.png").read_bytes()
    (vid / "00001.png").write_bytes(raw[: len(raw) // 2])
    cfg = _cfg(tmp_path / "frames", tmp_path / "r", "data.num_workers=1", "data.gap_min=1", "data.gap_max=1",
               "max_steps=2")
    with pytest.raises(DensekitError) as err:
        Trainer(cfg, objective_cls=TinyDense, backbone_fn=tiny_backbone_bn).fit()
    assert "\n" not in str(err.value) and "00001" in str(err.value)


# --------------------------------------------------------------------------------------------------
# CLI end to end
# --------------------------------------------------------------------------------------------------


def test_cli_train_end_to_end(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from densekit.apps.cli import main
    from densekit.serve.checkpoint import load_checkpoint

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("batch_size: 2\ndata:\n  size: [32, 32]\n  gap_max: 2\n  num_workers: 0\n")
    run = tmp_path / "run"
    objective = f"{TinyDense.__module__}:TinyDense"
    args = ["train", "--objective", objective, "--backbone", "resnet18", "--data", str(sample), "--out", str(run),
            "--config", str(cfg_file), "max_steps=3", "save_every=2", "progress=false", "tensorboard=false"]
    assert main(args) == 0
    assert (run / "config.yaml").is_file() and (run / "state.safetensors").is_file()
    bb = load_checkpoint(run / "backbone.safetensors")
    assert bb.meta.objective == "tinydense"
    saved = build_config(run / "config.yaml")
    assert saved.batch_size == 2 and saved.max_steps == 3 and saved.data.size == [32, 32]
    # Resuming a finished run is a no-op that keeps the weights; a fresh run into the same folder is refused.
    before = _weights(run)
    assert main(["train", "--out", str(run), "--resume", "progress=false"]) == 0
    _assert_identical(before, _weights(run))
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", "--objective", objective, "--backbone", "resnet18", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_minutes_is_a_cpu_budget_that_sets_the_schedule(sample: Path, tmp_path: Path, capsys) -> None:
    """``--minutes`` counts CPU time unless ``--clock wall``; without a max_steps the budget alone sizes the
    schedule; the closing line says which clock ran, how long, and the wall time; bad values are one line."""
    from densekit.apps.cli import main

    objective = f"{TinyDense.__module__}:TinyDense"
    common = ["--objective", objective, "--backbone", "resnet18", "--data", str(sample), "batch_size=2",
              "data.size=[32,32]", "data.num_workers=0", "progress=false", "tensorboard=false", "save_every=0"]
    run = tmp_path / "cpu"
    assert main(["train", "--out", str(run), "--minutes", "0.05", *common]) == 0
    cfg = build_config(run / "config.yaml")
    assert (cfg.budget_s, cfg.clock, cfg.max_steps) == (3.0, "cpu", 1_000_000)
    (end,) = _records(run, "end")
    # the schedule is sized to end with the budget: either may stop the run, close to 3 s
    assert end["clock"] == "cpu" and end["max_steps"] < 1_000_000 and 2.5 <= end["seconds"] <= 6.0, end
    text = capsys.readouterr().out
    assert "s of cpu clock of a 3 s budget" in text and "s wall" in text, text
    run = tmp_path / "wall"
    assert main(["train", "--out", str(run), "--minutes", "0.05", "--clock", "wall", "max_steps=40", *common]) == 0
    cfg = build_config(run / "config.yaml")
    assert (cfg.budget_s, cfg.clock, cfg.max_steps) == (3.0, "wall", 40)  # an explicit max_steps stays the cap
    for bad, words in ((["--minutes", "-1"], "--minutes must be a positive number"),
                       (["--minutes", "1", "--clock", "gpu"], "--clock must be cpu or wall")):
        capsys.readouterr()
        assert main(["train", "--out", str(tmp_path / "bad"), *bad, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------------
# The interface for ViT objectives (issue 12: IC-2 ...)
# --------------------------------------------------------------------------------------------------


def test_backbone_kwargs_reach_timm_and_the_exported_checkpoint(sample: Path, tmp_path: Path) -> None:
    from densekit.serve.checkpoint import load_checkpoint
    from densekit.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = _cfg(sample, run, "max_steps=2", "backbone=timm:vit_tiny_patch16_224", "backbone_kwargs.depth=1",
               "backbone_kwargs.patch_size=8", "backbone_kwargs.img_size=32")
    Trainer(cfg, objective_cls=TinyDense).fit()
    bb = load_checkpoint(run / "backbone.safetensors")
    assert bb.meta.arch["kwargs"] == {"depth": 1, "img_size": 32, "patch_size": 8} and bb.meta.stride == 8
    assert len(bb.body.model.blocks) == 1
    state = _weights(run)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, state[f"model.backbone.{k}"]), k
    assert build_config(run / "config.yaml").backbone_kwargs == {"depth": 1, "patch_size": 8, "img_size": 32}
    with pytest.raises(DensekitError, match="do not apply to a checkpoint"):
        Trainer(_cfg(sample, tmp_path / "r2", f"backbone={run / 'backbone.safetensors'}", "backbone_kwargs.depth=2"),
                objective_cls=TinyDense).fit()


class FrozenHeadFirstSteps(TinyDense):
    """TinyDense whose head gets no update for the first 2 steps (DINO's freeze_last_layer through the pre-step
    hook); records what the hook saw."""

    name = "frozenhead"
    seen: list[tuple[int, int, bool]] = []
    before: list[torch.Tensor] = []

    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        from densekit.train.heads import cancel_last_layer_grads

        type(self).seen.append((step, max_steps, self.head.weight.grad is not None))
        type(self).before.append(self.head.weight.detach().clone())
        cancel_last_layer_grads(self, step, freeze_steps=2, key="head.")


def test_before_optimizer_step_runs_between_backward_and_step(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer

    FrozenHeadFirstSteps.seen, FrozenHeadFirstSteps.before = [], []
    after: list[torch.Tensor] = []
    hook = lambda tr, step: after.append(tr.model.head.weight.detach().clone())  # noqa: E731
    cfg = _cfg(sample, tmp_path / "run", "max_steps=3", "save_every=0")
    Trainer(cfg, objective_cls=FrozenHeadFirstSteps, backbone_fn=tiny_backbone_bn, hooks=[hook]).fit()
    assert FrozenHeadFirstSteps.seen == [(0, 3, True), (1, 3, True), (2, 3, True)]  # gradients already there
    initial = FrozenHeadFirstSteps.before[0]
    assert torch.equal(after[0], initial) and torch.equal(after[1], initial)  # no update (not even decay)
    assert not torch.equal(after[2], initial)
    assert torch.equal(FrozenHeadFirstSteps.before[2], after[1])  # the hook runs before the step


def test_per_param_clipping_and_weight_decay_schedule(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer, clip_gradients, load_state, weight_decay_at

    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0, 0.0, 0.0])
    total = clip_gradients([a, b], 1.0, "per_param")
    assert float(total) == pytest.approx((25 + 0.01) ** 0.5)
    assert float(a.grad.norm()) == pytest.approx(1.0, abs=1e-5) and torch.equal(b.grad, torch.tensor([0.1, 0, 0, 0]))
    a.grad = torch.tensor([3.0, 4.0, 0.0])
    b.grad = torch.tensor([0.1, 0.0, 0.0, 0.0])
    clip_gradients([a, b], 1.0, "global")
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0, abs=1e-5) and float(b.grad[0]) < 0.05

    cfg = _cfg(sample, tmp_path / "run", "max_steps=4", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
               "optim.grad_clip_mode=per_param")
    assert [round(weight_decay_at(s, cfg), 6) for s in (0, 2, 4)] == [0.04, 0.22, 0.4]
    assert weight_decay_at(3, _cfg(sample, tmp_path / "x")) == 0.05  # no end: constant
    Trainer(cfg, objective_cls=TinyDense).fit()
    _, meta = load_state(tmp_path / "run" / "state.safetensors")
    groups = meta["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == pytest.approx(weight_decay_at(3, cfg)) and groups[1]["weight_decay"] == 0.0
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["weight_decay"] for r in logged if "step" in r] == pytest.approx([weight_decay_at(s, cfg) for s in range(4)])
    with pytest.raises(DensekitError, match="grad_clip_mode"):
        _cfg(sample, tmp_path / "y", "optim.grad_clip_mode=layer")


class ExportsTeacher(TinyDense):
    name = "exportsteacher"

    def export_backbone(self) -> DenseBackbone:
        return self.teacher["backbone"]


def test_export_backbone_chooses_what_is_exported(sample: Path, tmp_path: Path) -> None:
    from densekit.serve.checkpoint import load_checkpoint
    from densekit.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_cfg(sample, run, "max_steps=2"), objective_cls=ExportsTeacher).fit()
    bb, state = load_checkpoint(run / "backbone.safetensors"), _weights(run)
    assert bb.meta.objective == "exportsteacher"
    for k, v in bb.state_dict().items():
        assert torch.equal(v, state[f"model.teacher.backbone.{k}"]), k
    assert any(not torch.equal(v, state[f"model.backbone.{k}"]) for k, v in bb.state_dict().items())


class RecordsGrads(TinyDense):
    name = "recordsgrads"
    grads: list[torch.Tensor] = []

    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        type(self).grads.append(self.head.weight.grad.detach().clone())


def test_before_optimizer_step_sees_unscaled_gradients_under_a_grad_scaler(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer, _Run

    cfg = _cfg(sample, tmp_path / "run", "hparams.drop=0.0", "optim.grad_clip=0")
    trainer = Trainer(cfg, objective_cls=RecordsGrads, backbone_fn=tiny_backbone_nobn)
    model = trainer._build_objective().train()
    reference = copy.deepcopy(model)
    opt = trainer._build_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # what fp16 AMP does on CUDA
    run = _Run(model, model, opt, scaler, [p for p in model.parameters() if p.requires_grad], torch.device("cpu"),
               False, torch.float16, list(trainer._decay_groups))
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(4, 3, 32, 32, generator=g), "view2": torch.randn(4, 3, 32, 32, generator=g)}
    RecordsGrads.grads = []
    trainer._train_step(run, batch)
    reference(batch)["loss"].backward()
    torch.testing.assert_close(RecordsGrads.grads[0], reference.head.weight.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Fine-tuning a pretrained start (finetune.freeze_until, finetune.backbone_lr_mult; issue 13)
# --------------------------------------------------------------------------------------------------


def _state_meta(run: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(run / "state.safetensors"), "pt") as fh:
        return json.loads(fh.metadata()["densekit_train_state"])


def test_frozen_stages_keep_their_weights_and_statistics_and_the_backbone_trains_slower(
        sample: Path, tmp_path: Path) -> None:
    from densekit.serve.backbones import build_backbone
    from densekit.train.finetune import trainable_prefixes
    from densekit.train.trainer import Trainer

    start = build_backbone("resnet18", seed=0)
    keep = trainable_prefixes(start, "layer2")
    assert keep == ["body.layer3"] or keep[0] == "body.layer3", keep
    run = tmp_path / "run"
    Trainer(_cfg(sample, run, "finetune.freeze_until=layer2", "finetune.backbone_lr_mult=0.1"),
            objective_cls=TinyDense).fit()
    after = _weights(run)
    frozen = changed = 0
    for k, v in start.state_dict().items():  # parameters and BatchNorm running statistics
        now = after[f"model.backbone.{k}"]
        if any(k.startswith(p + ".") for p in keep):
            changed += int(not torch.equal(now, v))
        else:
            assert torch.equal(now, v), f"{k} of a frozen stage moved"
            frozen += 1
    assert frozen > 20 and changed > 0, (frozen, changed)
    groups = _state_meta(run)["optimizer"]["param_groups"]
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.1, 1.0]
    head = [g["lr"] for g in groups if g["lr_scale"] == 1.0]
    body = [g["lr"] for g in groups if g["lr_scale"] == 0.1]
    assert head[0] > 0 and all(b == pytest.approx(0.1 * head[0]) for b in body)  # the last step's rates


def test_plain_runs_keep_two_optimizer_groups(sample: Path, tmp_path: Path) -> None:
    """Without the settings the optimiser is what it was (so that earlier runs resume)."""
    from densekit.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_cfg(sample, run, "max_steps=1"), objective_cls=TinyDense).fit()
    groups = _state_meta(run)["optimizer"]["param_groups"]
    assert len(groups) == 2 and not any("lr_scale" in g for g in groups)


@pytest.mark.parametrize(("setting", "words"), [
    ("finetune.freeze_until=layer9", "no such stage (its stages: layer1"),
    ("finetune.freeze_until=layer3", "freezes every stage of the backbone"),
    ("finetune.backbone_lr_mult=0", "backbone_lr_mult must be a positive number"),
])
def test_finetune_settings_that_cannot_train_are_one_line(sample: Path, tmp_path: Path, capsys, setting: str,
                                                           words: str) -> None:
    from densekit.apps.cli import main

    out = tmp_path / "run"
    args = ["train", "--objective", f"{TinyDense.__module__}:TinyDense", "--backbone", "resnet18", "--data",
            str(sample), "--out", str(out), "batch_size=2", "data.size=[32,32]", "data.num_workers=0",
            "progress=false", "tensorboard=false", "max_steps=2", setting]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not (out / "state.safetensors").exists()
