"""The generic trainer on a toy learned editor: early stopping, best checkpoint, exact resume, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeledit.training import TrainConfig, train_editor


class Toy:
    """A "learned editor" with one weight vector: training pulls it towards noisy targets near a point;
    the validation loss is its distance to ``val_target``."""

    def __init__(self, lr: float = 0.05):
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.lr, self.training = lr, True
        self.modes: list[bool] = []

    def param_groups(self) -> list[dict]:
        return [{"params": [self.w], "lr": self.lr}]

    def training_loss(self, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = ((self.w - target) ** 2).sum()
        return loss, {"es": 100.0 * float(loss < 0.1)}

    def train(self, mode: bool = True) -> Toy:
        self.training = mode
        self.modes.append(mode)
        return self

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach().clone()}, str(Path(directory) / "toy.safetensors"))

    def load(self, directory: str | Path) -> None:
        with torch.no_grad():
            self.w.copy_(load_file(str(Path(directory) / "toy.safetensors"))["w"])


def batches(train_target: float):
    def batch(i: int) -> torch.Tensor:
        noise = torch.randn(3, generator=torch.Generator().manual_seed(i)) * 0.1
        return torch.full((3,), train_target) + noise

    return batch


def val(target: float) -> list[torch.Tensor]:
    return [torch.full((3,), target)]


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    # Training walks w from 0 towards 1; the validation optimum is w = 0.3, passed after a few steps.
    toy = Toy()
    config = TrainConfig(steps=500, val_every=2, patience=3, log_every=2)
    metrics = train_editor(toy, batches(1.0), val(0.3), config, tmp_path, progress=False)
    assert metrics["stop_reason"].startswith("early stopping") and metrics["steps"] < 100
    val_losses = [h["loss"] for h in metrics["history"] if h["split"] == "val"]
    assert metrics["best_val"]["loss"] == min(val_losses) < val_losses[-1]
    saved = load_file(str(tmp_path / "toy.safetensors"))["w"]
    assert torch.equal(toy.w.detach(), saved), "the best editor is loaded at the end"
    assert float(((saved - 0.3) ** 2).sum()) == pytest.approx(metrics["best_val"]["loss"])
    assert toy.modes[-1] is False, "the trained editor is left in evaluation mode"
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == metrics["steps"]
    assert metrics["peak_rss_mb"] > 0


def test_resume_continues_exactly_where_training_stopped(tmp_path):
    config = TrainConfig(steps=12, val_every=4, patience=100, log_every=4)
    straight = Toy()
    train_editor(straight, batches(1.0), val(1.0), config, tmp_path / "straight", progress=False)

    first = Toy()
    train_editor(
        first,
        batches(1.0),
        val(1.0),
        TrainConfig(steps=8, val_every=4, patience=100, log_every=4),
        tmp_path / "resumed",
        progress=False,
    )
    second = Toy()  # a fresh process: nothing but the files
    metrics = train_editor(
        second, batches(1.0), val(1.0), config, tmp_path / "resumed", resume=True, progress=False
    )
    assert metrics["steps"] == 12
    assert torch.equal(second.w.detach(), straight.w.detach()), "same batches and the same Adam state"
    assert [h["step"] for h in metrics["history"] if h["split"] == "val"] == [4, 8, 12]


def test_gradient_accumulation_averages_consecutive_batches(tmp_path):
    seen: list[int] = []
    batch = batches(1.0)

    def recording(i: int) -> torch.Tensor:
        seen.append(i)
        return batch(i)

    config = TrainConfig(steps=2, grad_accum=3, val_every=100, log_every=1)
    metrics = train_editor(Toy(), recording, val(1.0), config, tmp_path, progress=False)
    assert seen == [0, 1, 2, 3, 4, 5]
    # At w = 0 the gradient of batch i is -2 t_i: the first step's (unclipped) norm is that of their mean.
    expected = torch.stack([-2 * batch(i) for i in range(3)]).mean(0).norm()
    assert metrics["history"][0]["grad_norm"] == pytest.approx(float(expected), rel=1e-5)


def test_time_limit_stops_after_a_final_validation(tmp_path):
    toy = Toy()
    metrics = train_editor(
        toy,
        batches(1.0),
        val(1.0),
        TrainConfig(steps=10_000, val_every=10_000, max_seconds=0.0),
        tmp_path,
        progress=False,
    )
    assert metrics["steps"] == 1 and metrics["stop_reason"].startswith("time limit")
    assert metrics["best_val"] is not None and (tmp_path / "last" / "trainer.json").exists()
