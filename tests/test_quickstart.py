"""The training quick start of docs/training.md, shortened to the tiny data: the documented
command runs end to end on a fresh clone and gives a bundle the service can load."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import RESNET20

from training.bundle import load_bundle
from training.cli import main as cli_main


def test_the_documented_quick_start_builds_a_loadable_bundle(tiny_data, tmp_path, capsys):
    docs = Path("docs/training.md").read_text()
    command = re.search(r"python -m training build --config (configs/quickstart\.yaml)", docs)
    assert command, "docs/training.md no longer shows the quick start command"
    out = tmp_path / "bundle"
    shortened = [f"{k}={v}" for k, v in {
        "run_dir": tmp_path / "run", "data.train": tiny_data["id"], "data.aux": tiny_data["aux"],
        "data.cache_dir": tiny_data["cache"], "data.num_workers": 0, "data.val_fraction": 0.2,
        "data.aux_val_fraction": 0.25, "train.batch_size": 8, "train.aux_batch_size": 16,
        "sampler.pool_size": 32, "sampler.num_clusters": 8, "train.device": "cpu",
        "train.max_steps_per_epoch": 2, "evaluation.id_test": tiny_data["id"],
        "evaluation.ood": "{noise: 'synthetic:uniform:16'}", "evaluation.profile_ood": "noise",
        "evaluation.validation_ood": "{blobs: 'synthetic:blobs:16:1'}",
        "evaluation.selection_images": 16, "export.dir": out}.items()]
    assert cli_main(["build", "--config", command.group(1), *shortened]) == 0, \
        capsys.readouterr().err
    bundle = load_bundle(out)
    assert bundle.manifest.provenance["pretrained"]["source"].endswith(RESNET20.name)
    choice = json.loads((out / "report.json").read_text())["choice"]
    assert [c["alpha"] for c in choice["candidates"]] == [0.5, 1.0]
    assert "Served operating point" in (out / "report.md").read_text()
