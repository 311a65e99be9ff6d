"""bench/train_step.py: the weights it starts from on a fresh clone, and a sampler timing that
calls the sampler as a training step does (device, generator, picks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import RESNET20, tiny_config

from training.trainer import Trainer, prepare

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(tmp_path: Path, pretrained: str | None) -> str:
    """A config whose model.pretrained is ``pretrained``, the shipped checkpoint as its
    ``pretrained`` baseline, as in configs/*gregplus*.yaml."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "data": {"train": "unused"}, "loss": {"mode": "ce"},
        "model": {"pretrained": pretrained},
        "evaluation": {"baselines": {"pretrained": str(RESNET20)}},
    }))
    return str(path)


def test_a_missing_stage_one_run_falls_back_to_the_shipped_checkpoint(bench, tmp_path):
    missing = str(tmp_path / "runs" / "model.safetensors")
    overrides, described = bench.initialisation(write_config(tmp_path, missing), [])
    assert overrides == [f'model.pretrained="{RESNET20}"']
    assert str(RESNET20) in described and missing in described


def test_existing_explicit_or_no_weights_are_used_as_given(bench, tmp_path):
    assert bench.initialisation(write_config(tmp_path, str(RESNET20)), []) == ([], str(RESNET20))
    missing = str(tmp_path / "typo.safetensors")
    config = write_config(tmp_path, None)
    assert bench.initialisation(config, [f"model.pretrained={missing}"]) == ([], missing)
    overrides, described = bench.initialisation(config, [])
    assert overrides == [] and described.startswith("random")


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
])
def test_sampler_timing_calls_the_sampler_as_train_step_does(bench, tiny_data, tmp_path,
                                                             monkeypatch, device):
    trainer = Trainer(prepare(tiny_config(tiny_data, tmp_path / "run", f"train.device={device}")))
    id_batch, aux_batch = next(trainer.batches())
    calls = []
    select = trainer.sampler.select

    def spy(model, pool, generator):
        chosen = select(model, pool, generator)
        calls.append((pool.device, generator.device, chosen))
        return chosen

    monkeypatch.setattr(trainer.sampler, "select", spy)
    seconds = bench.time_sampler(trainer, aux_batch[0], steps=1)  # 2 warm-up calls + 1
    trainer.train_step(id_batch, aux_batch)
    assert seconds > 0 and len(calls) == 4
    assert all(p == g == c.device == trainer.rt.device for p, g, c in calls)
    if device == "cpu":  # CUDA's index_add_ (k-means' sums) adds in no fixed order
        assert all(torch.equal(c, calls[-1][2]) for _, _, c in calls)
