"""Config files: ``base:`` inheritance, and every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, load_config, read_config_file


def test_every_shipped_config_loads_and_none_exports_into_models():
    configs = sorted(Path("configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(path)
        assert cfg.export.dir is None or not cfg.export.dir.startswith("models"), path


def test_stage_1b_differs_from_stage_1_in_what_it_writes_only():
    a = load_config("configs/cifar10_resnet56_ce_jpeg.yaml").model_dump()
    b = load_config("configs/cifar10_resnet56_ce_jpeg_b.yaml").model_dump()
    diff = {(s, k) for s in a for k in (a[s] if isinstance(a[s], dict) else [None])
            if (a[s] if k is None else a[s][k]) != (b[s] if k is None else b[s][k])}
    assert diff == {("run_dir", None), ("model", "pretrained"), ("optim", "lr"),
                    ("train", "epochs")}


def test_a_file_overrides_its_base_key_by_key_and_paths_are_relative_to_it(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text(
        "data: {train: a, val_fraction: 0.2}\noptim: {lr: 0.1, momentum: 0.5}\n")
    (tmp_path / "run.yaml").write_text(
        "base: common/base.yaml\nrun_dir: r\nloss: {mode: ce}\noptim: {lr: 0.3}\n")
    cfg = load_config(tmp_path / "run.yaml", ["data.train=b"])
    assert (cfg.data.train, cfg.data.val_fraction) == ("b", 0.2)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.3, 0.5)
    assert "base" not in read_config_file(tmp_path / "run.yaml")


@pytest.mark.parametrize("files,message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "loops back"),
    ({"a.yaml": "base: missing.yaml\n"}, "config file not found"),
    ({"a.yaml": "base: [x]\n"}, "base must be the path"),
])
def test_bad_bases_are_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")
