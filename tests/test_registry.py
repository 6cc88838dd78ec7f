"""Adding a beta mode is one file and one registry line: a toy mode written in this file alone, with a
flag, a state and an after-step hook, trains, checkpoints, resumes and evaluates through train.py and
evaluate.py, none of which names it."""

import json
import math

import pytest
import torch
from test_train import common

import evaluate
import registry
import train
from beta_mode import BetaMode, JsonState


class ScaledBeta(JsonState, BetaMode):
    """A toy mode: beta = --toy_scale * beta0 for every pair; it counts the optimizer steps applied."""

    about = "toy: beta = --toy_scale * beta0"
    FILE, WHAT = "toy.json", "the toy mode's scale and step count"

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale, self.steps = scale, 0

    @classmethod
    def add_flags(cls, group) -> None:
        group.add_argument("--toy_scale", type=float, default=2.0, help="beta = toy_scale * beta0")

    @classmethod
    def check_flags(cls, args, error) -> None:
        if args.toy_scale <= 0:
            error(f"--toy_scale must be > 0; got {args.toy_scale}")

    @classmethod
    def from_config(cls, cfg: dict, hidden_size) -> "ScaledBeta":
        return cls(cfg["toy_scale"])

    @classmethod
    def from_pretrained(cls, directory: str, cfg: dict | None = None) -> "ScaledBeta":
        mode = cls()
        mode.load_state(cls.read_state(directory))
        return mode

    def prompt_beta(self, ppl, h, beta0, beta_min=0.0, beta_max=math.inf):
        beta = torch.full_like(ppl, self.scale * beta0, dtype=torch.float32)
        return beta, beta

    def after_step(self, applied: bool) -> None:
        self.steps += int(applied)

    def state(self) -> dict:
        return dict(scale=self.scale, steps=self.steps)

    def load_state(self, state: dict) -> None:
        self.scale, self.steps = state["scale"], state["steps"]


def test_a_toy_mode_is_one_file_and_one_registry_line(tiny_qwen2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(registry.BETA_MODES, "toy", ScaledBeta)  # the registry line
    out = tmp_path / "toy"
    flags = common(tiny_qwen2_dir, out, "--beta_mode", "toy", "--toy_scale", "3", "--beta", "0.05",
                   "--max_steps", "2", "--save_every_steps", "1", "--report_to", "none")
    train.main(flags)
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [m for m in lines if m["split"] == "train"]
    assert logged and all(m["beta/mean"] == pytest.approx(0.15, rel=1e-6) for m in logged)  # 3 x beta0
    final = json.load(open(out / "final" / "eval.json"))["metrics"]
    assert final["beta/mean"] == pytest.approx(0.15, rel=1e-6)
    assert final["rewards/margins"] == pytest.approx(3 * final["rewards_beta0/margins"], rel=1e-4)
    assert json.load(open(out / "final" / "toy.json")) == dict(scale=3.0, steps=2)  # its state, saved
    assert json.load(open(out / "checkpoints" / "step_1" / "toy.json")) == dict(scale=3.0, steps=1)
    # resumed from step 1, it ends where the uninterrupted run ended, its state included
    resumed = tmp_path / "resumed"
    train.main(common(tiny_qwen2_dir, resumed, *flags[len(common(tiny_qwen2_dir, out)):],
                      "--resume_from", str(out / "checkpoints" / "step_1")))
    again = json.load(open(resumed / "final" / "eval.json"))["metrics"]
    assert json.load(open(resumed / "final" / "toy.json")) == dict(scale=3.0, steps=2)
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-6)
    # evaluate.py loads it from the checkpoint alone
    assert evaluate.main(["--ckpt", str(out / "final"), "--out_name", "again"])["loss"] == pytest.approx(final["loss"], rel=1e-6)
    # its flag is its own: another mode refuses it, and its check runs
    for bad, message in ((["--beta_mode", "fixed", "--toy_scale", "3"], "--toy_scale only applies to --beta_mode toy"),
                         (["--beta_mode", "toy", "--toy_scale", "0"], "--toy_scale must be > 0")):
        with pytest.raises(SystemExit):
            train.get_args(bad)
        assert message in capsys.readouterr().err
