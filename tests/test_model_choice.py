"""Model choice on validation data only, the unseen outlier split, the served operating point in
reports, one selection subset for evaluate and export, and the ablation command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import RESNET20, tiny_config

from training import model_choice, pipeline, report
from training.bundle import load_bundle
from training.calibration import is_ood
from training.cli import main as cli_main
from training.data import sources
from training.data.sources import open_dataset
from training.evaluation import score_dataset
from training.models import build_model, load_weights
from training.trainer import Trainer, prepare, train
from training.weight_interpolation import interpolate_states


def test_validation_outliers_are_never_trained_on_and_are_recorded(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", "data.aux_val_fraction=0.25",
                      "train.epochs=1", "train.max_steps_per_epoch=1")
    prep = prepare(cfg)
    trained_on = set(prep.aux_set.base.indices)
    held = set(prep.aux_val_indices)
    assert len(held) == 12 and not trained_on & held
    assert trained_on | held == set(range(48))
    trainer = Trainer(prep)
    trainer.run()
    trainer.finish()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["aux_split"]["val_indices"] == sorted(held)
    assert run["aux_split"]["val_fraction"] == 0.25
    # same seed, same split; another seed, another one
    again = prepare(tiny_config(tiny_data, tmp_path / "b", "data.aux_val_fraction=0.25"))
    other = prepare(tiny_config(tiny_data, tmp_path / "c", "data.aux_val_fraction=0.25",
                                "seed=1"))
    assert again.aux_val_indices == sorted(held) != other.aux_val_indices


def _fake_validate(figures):
    """validate() stand-in: figures[alpha] = (accuracy, mean FPR95, mean AUROC); the start
    (the first call, without outlier sets) scores 0.90."""
    calls = []

    def validate(model, val_id, val_ood, device, **kw):
        if not val_ood:
            return 0.90, {}, {}
        alpha = sorted(figures)[len(calls)]
        calls.append(alpha)
        acc, fpr, auroc = figures[alpha]
        return acc, {"s": fpr}, {"s": auroc}
    return validate


@pytest.mark.parametrize("figures,chosen,within", [
    # the best separation is over the drop: the best one within it wins
    ({0.5: (0.895, 0.30, 0.90), 0.8: (0.888, 0.10, 0.95), 1.0: (0.884, 0.01, 0.99)}, 0.8, True),
    # a tie on FPR95 goes to the higher AUROC, then to the larger a
    ({0.5: (0.90, 0.10, 0.96), 0.8: (0.90, 0.10, 0.95), 1.0: (0.90, 0.10, 0.96)}, 1.0, True),
    # nothing within the drop: the most accurate
    ({0.5: (0.80, 0.30, 0.90), 0.8: (0.82, 0.10, 0.95), 1.0: (0.81, 0.01, 0.99)}, 0.8, False),
])
def test_the_choice_follows_its_written_rule(monkeypatch, figures, chosen, within):
    monkeypatch.setattr(model_choice, "validate", _fake_validate(figures))
    model = build_model("resnet20", num_classes=10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 1 if v.is_floating_point() else v for k, v in start.items()}
    choice = model_choice.choose_interpolation(
        model, start, end, list(figures), val_id=None, val_ood={"s": None}, max_drop=1.5,
        device=torch.device("cpu"))
    assert (choice.chosen.alpha, choice.within_drop) == (chosen, within)
    want = interpolate_states(start, end, chosen)
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert "(chosen)" in choice.markdown()


def test_export_chooses_on_validation_data_before_any_test_set_is_opened(
        tiny_data, tmp_path, monkeypatch):
    test_id, test_ood = str(tiny_data["id"]) + "/../id", "synthetic:uniform:16"
    cfg = tiny_config(
        tiny_data, tmp_path / "run", "train.epochs=1", "train.max_steps_per_epoch=2",
        "optim.lr=0.05", "data.aux_val_fraction=0.25", f"evaluation.id_test={test_id}",
        f"evaluation.ood={{noise: '{test_ood}'}}", "evaluation.profile_ood=noise",
        "evaluation.validation_ood={gauss: 'synthetic:gaussian:16:1'}",
        "evaluation.selection_images=16", "evaluation.baselines={}",
        f"export.dir={tmp_path / 'bundle'}", "export.interpolation_candidates=[0.0, 0.5, 1.0]")
    train(cfg)
    opened, seen_by_choice = [], {}
    real_open, real_choose = pipeline.open_dataset, pipeline.choose_interpolation

    def recording_open(source, *a, **kw):
        opened.append(source)
        return real_open(source, *a, **kw)

    def recording_choose(*a, **kw):
        seen_by_choice["opened"] = list(opened)
        seen_by_choice["val_ood"] = sorted(kw["val_ood"])
        seen_by_choice["val_id"] = list(kw["val_id"].indices)
        return real_choose(*a, **kw)

    monkeypatch.setattr(pipeline, "open_dataset", recording_open)
    monkeypatch.setattr(sources, "open_dataset", recording_open)  # open_unlabelled's
    monkeypatch.setattr(pipeline, "choose_interpolation", recording_choose)
    out = pipeline.export_run(cfg)
    assert test_id not in seen_by_choice["opened"] and test_ood not in seen_by_choice["opened"]
    assert {test_id, test_ood} <= set(opened)  # ...which the evaluation then does open
    assert seen_by_choice["val_ood"] == ["aux-val", "gauss"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert seen_by_choice["val_id"] == run["split"]["val_indices"]
    bundle = load_bundle(out)
    choice = bundle.manifest.evaluation["choice"]
    assert [c["alpha"] for c in choice["candidates"]] == [0.0, 0.5, 1.0]
    start, end = build_model("resnet20", num_classes=10), build_model("resnet20", num_classes=10)
    load_weights(start, RESNET20)
    load_weights(end, tmp_path / "run" / "model.safetensors")
    want = interpolate_states(start.state_dict(), end.state_dict(), choice["alpha"])
    got = bundle.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "## Choice of the weights (validation data only)" in (out / "report.md").read_text()


def test_evaluate_bundle_reports_the_served_operating_point(tiny_bundle, tiny_data, tmp_path,
                                                            capsys):
    out = tmp_path / "report"
    code = cli_main(["evaluate", "--bundle", str(tiny_bundle), "--id", str(tiny_data["id"]),
                     "--ood", f"tin={tiny_data['aux']}", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Served operating point" in printed and "**any (default)**" in printed
    op = json.loads((out / "report.json").read_text())["operating_point"]
    # by hand: the bundle's model and thresholds over the same images
    bundle = load_bundle(tiny_bundle)
    m, cpu = bundle.manifest, torch.device("cpu")
    tf = m.preprocessing.eval_transform()
    taps = [m.featurenorm.selected_block]
    ident = score_dataset(bundle.model, open_dataset(str(tiny_data["id"]), labeled=True,
                                                     transform=tf), cpu, taps=taps)
    tin = score_dataset(bundle.model, open_dataset(str(tiny_data["aux"]), labeled=False,
                                                   transform=tf, image_size=32), cpu, taps=taps)
    e_thr, f_thr = m.calibration["energy"].threshold, m.calibration["featurenorm"].threshold

    def flags(s):
        e = s.of("energy") > e_thr
        f = s.of("featurenorm", taps[0]) < f_thr
        return {"energy": e, "featurenorm": f, "any": e | f, "all": e & f}

    for key, flagged in flags(ident).items():
        assert op["id_accepted"][key] == pytest.approx(1 - flagged.mean())
    for key, flagged in flags(tin).items():
        assert op["ood_rejected"]["tin"][key] == pytest.approx(flagged.mean())
    assert np.array_equal(flags(ident)["energy"],
                          is_ood(ident.of("energy"), e_thr, higher_is_id=False))


def test_evaluate_and_export_select_the_block_on_the_same_images(tiny_data, tmp_path,
                                                                 monkeypatch):
    cfg_args = ["train.epochs=1", "train.max_steps_per_epoch=1", "loss.mode=ce",
                f"evaluation.id_test={tiny_data['id']}",
                "evaluation.ood={noise: 'synthetic:uniform:8'}", "evaluation.profile_ood=noise",
                "evaluation.selection_images=20", "evaluation.baselines={}",
                f"export.dir={tmp_path / 'bundle'}"]
    cfg = tiny_config(tiny_data, tmp_path / "run", *cfg_args)
    train(cfg)
    selections = []
    real = report.norm_ratios

    def recording(model, dataset, *a, **kw):
        selections.append(sorted(dataset.indices))
        return real(model, dataset, *a, **kw)

    monkeypatch.setattr(report, "norm_ratios", recording)
    pipeline.export_run(cfg)
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert cli_main(["evaluate", "--config", str(config), "--id", str(tiny_data["id"]),
                     "--ood", "noise=synthetic:uniform:8"]) == 0
    assert len(selections) == 2 and selections[0] == selections[1]
    full = open_dataset(str(tiny_data["id"]), labeled=True, transform=None)
    classes = {full.targets[i] for i in selections[0]}
    assert len(selections[0]) == 20 and len(classes) >= 6  # not the first two classes' images


def test_ablate_trains_each_mode_from_one_start_and_tables_them(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "abl"
    cfg = tiny_config(tiny_data, run_dir)
    overrides = [f"{k}={v}" for k, v in {
        "run_dir": run_dir, "data.train": tiny_data["id"], "data.aux": tiny_data["aux"],
        "data.cache_dir": tiny_data["cache"], "data.num_workers": 0, "data.val_fraction": 0.2,
        "data.aux_val_fraction": 0.25, "model.pretrained": RESNET20, "train.batch_size": 8,
        "train.aux_batch_size": 16, "sampler.pool_size": 32, "sampler.num_clusters": 8,
        "train.device": "cpu", "train.max_steps_per_epoch": 2, "loss.m_in": -12,
        "loss.m_out": -8, "evaluation.id_test": tiny_data["id"],
        "evaluation.ood": "{noise: 'synthetic:uniform:8'}", "evaluation.profile_ood": "noise",
        "evaluation.selection_images": 16, "evaluation.baselines": "{}"}.items()]
    assert cfg.loss.mode == "greg+"
    out = tmp_path / "table"
    assert cli_main(["ablate", "--config", "configs/cifar10_resnet20_gregplus.yaml",
                     *overrides, "--modes", "ce", "energy", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["mode"] for r in rows] == ["ce", "energy"]
    assert [r["run_dir"] for r in rows] == [f"{run_dir}-ce", f"{run_dir}-energy"]
    assert all(r["steps"] == 2 and set(r["ood"]) == {"noise", "aux-val"} for r in rows)
    starts = {json.loads((tmp_path / f"abl-{m}" / "run.json").read_text())["config"]["model"][
        "pretrained"] for m in ("ce", "energy")}
    assert starts == {str(RESNET20)}
    md = (out / "ablation.md").read_text()
    assert "| ce | 2 |" in md and "| energy | 2 |" in md and "aux-val" in md
    assert cli_main(["ablate", "--config", "configs/cifar10_resnet20_gregplus.yaml",
                     "--modes", "bogus"]) == 2
