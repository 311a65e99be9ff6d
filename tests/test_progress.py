"""Long offline steps show progress on a terminal and stay quiet in logs."""

from __future__ import annotations

import io
import sys

import torch
from torch.utils.data import TensorDataset

from training.evaluation import score_dataset
from training.models import build_model


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _score(monkeypatch, stream) -> None:
    monkeypatch.setattr(sys, "stderr", stream)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    score_dataset(build_model("resnet20", num_classes=10), data, torch.device("cpu"),
                  batch_size=2, desc="ID test")


def test_scoring_shows_a_named_bar_on_a_terminal_only(monkeypatch):
    terminal, log = _Terminal(), io.StringIO()
    _score(monkeypatch, terminal)
    assert "ID test" in terminal.getvalue() and "/4 " in terminal.getvalue()
    _score(monkeypatch, log)
    assert log.getvalue() == ""
