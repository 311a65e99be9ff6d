"""Calibration, the bundle format and its loader, and the config-to-bundle pipeline."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import RESNET20, SHARED, make_bundle, tiny_config
from safetensors.torch import save_file

import training.bundle
from training.bundle import BundleError, export_bundle, load_bundle
from training.calibration import (
    calibrate,
    calibrate_score,
    is_ood,
    quantile_table,
    threshold_for_tpr,
)
from training.cli import main as cli_main
from training.config import ConfigError
from training.data.archives import file_sha256
from training.data.sources import open_dataset
from training.detectors import DETECTORS, SERVED
from training.evaluation import score_batch, score_dataset
from training.models import build_model, load_weights
from training.pipeline import export_run
from training.trainer import train
from training.weight_interpolation import interpolate_states

NOTICE = SHARED / "checkpoints" / "LICENSE-akamaster-pytorch_resnet_cifar10"

# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("higher_is_id", [True, False])
@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.95, 0.99])
def test_threshold_keeps_the_requested_share_of_id_scores(higher_is_id, tpr):
    scores = np.random.default_rng(0).normal(size=20_000)
    thr = calibrate(scores, higher_is_id, tpr)
    kept = 1 - is_ood(scores, thr, higher_is_id).mean()
    assert kept == pytest.approx(tpr, abs=1e-3)
    assert is_ood(np.array([thr]), thr, higher_is_id)[0] == False


def test_quantile_table_gives_the_same_thresholds_at_grid_points_and_close_between():
    scores = np.random.default_rng(1).gamma(2.0, size=5000)
    for higher in (True, False):
        table = quantile_table(scores, higher)
        for tpr in (0.8, 0.9, 0.95, 0.999):
            assert threshold_for_tpr(table, tpr) == pytest.approx(calibrate(scores, higher, tpr),
                                                                  rel=1e-9)
        spacing = np.diff(np.sort(scores)).max()
        assert abs(threshold_for_tpr(table, 0.9123) - calibrate(scores, higher, 0.9123)) < spacing
        # a higher TPR accepts more: the threshold moves towards the OOD side
        a, b = threshold_for_tpr(table, 0.9), threshold_for_tpr(table, 0.99)
        assert (b < a) if higher else (b > a)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tpr"):
            threshold_for_tpr(table, bad)
    with pytest.raises(ValueError, match="finite"):
        quantile_table(np.array([1.0, np.inf]), True)


# ---------------------------------------------------------------- the bundle


def test_a_loaded_bundle_scores_exactly_like_the_exported_model(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.format_version == 1 and m.featurenorm.selected_block == "layer2.2"
    assert m.weights.sha256 == file_sha256(tiny_bundle / "model.safetensors")
    assert not bundle.model.training
    # the same construction, not loaded from disk
    torch.manual_seed(0)
    original = build_model("resnet20", num_classes=10).eval()
    images = torch.rand(8, 3, 32, 32)
    a = score_batch(original, images, m.taps)
    b = score_batch(bundle.model, images, m.taps)
    assert torch.equal(a.logits, b.logits)
    for block in ("layer2.2", "layer3.2"):
        for d in DETECTORS:
            assert torch.equal(a.of(d, block, block), b.of(d, block, block)), (d.name, block)
    thr = m.calibration["energy"].threshold
    assert threshold_for_tpr(m.calibration["energy"].quantiles, 0.95) == pytest.approx(thr)


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _reweigh(path, state):
    save_file(state, str(path / "model.safetensors"))
    sha256 = file_sha256(path / "model.safetensors")
    _edit_manifest(path, lambda m: m["weights"].update(sha256=sha256))


def _resnet56_state():
    return {k: v.contiguous() for k, v in build_model("resnet56").state_dict().items()}


BAD_BUNDLES = [
    ("no manifest", lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    ("not json", lambda p: (p / "manifest.json").write_text("{oops"), "not valid JSON"),
    ("future version", lambda p: _edit_manifest(p, lambda m: m.update(format_version=2)),
     "format_version 2 is not supported"),
    ("missing field", lambda p: _edit_manifest(p, lambda m: m.pop("classes")),
     "classes: Field required"),
    ("unknown field", lambda p: _edit_manifest(p, lambda m: m.update(colour="red")),
     "colour: Extra inputs are not permitted"),
    ("selected block not tapped", lambda p: _edit_manifest(
        p, lambda m: m["featurenorm"].update(selected_block="layer1.0")),
     "'layer1.0' is not among taps"),
    ("unknown block", lambda p: _edit_manifest(p, lambda m: m.update(taps=["layer2.2", "layer9"])),
     "unknown block(s) ['layer9']"),
    ("corrupt weights", lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:-1] + b"\0"), "does not match the manifest"),
    ("missing weights", lambda p: (p / "model.safetensors").unlink(),
     "model.safetensors is missing"),
    ("weights outside", lambda p: _edit_manifest(
        p, lambda m: m["weights"].update(file="../x.safetensors")), "inside the bundle directory"),
    ("other architecture", lambda p: _reweigh(p, _resnet56_state()),
     "does not fit CifarResNet"),
    ("other class count", lambda p: _edit_manifest(p, lambda m: m.update(classes=["a", "b"])),
     "num_classes differs from len(classes)"),
    ("bad quantiles", lambda p: _edit_manifest(
        p, lambda m: m["calibration"]["energy"]["quantiles"].update(values=[0.0] * 1000)),
     "same length"),
    ("flipped direction", lambda p: _edit_manifest(
        p, lambda m: (m["calibration"]["energy"].update(higher_is_id=True),
                      m["calibration"]["energy"]["quantiles"].update(higher_is_id=True))),
     "higher_is_id contradicts"),
    ("not safetensors", lambda p: _reweigh_bytes(p, b"\0" * 64), "unreadable safetensors"),
]


def _reweigh_bytes(path, data):
    (path / "model.safetensors").write_bytes(data)
    _edit_manifest(path, lambda m: m["weights"].update(sha256=file_sha256(
        path / "model.safetensors")))


@pytest.mark.parametrize("name,damage,message", BAD_BUNDLES, ids=[b[0] for b in BAD_BUNDLES])
def test_a_bad_bundle_is_refused_with_what_is_wrong(tiny_bundle, tmp_path, name, damage, message):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    damage(bundle)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert message in str(info.value)


def test_the_weights_loaded_are_the_bytes_hashed(tiny_bundle, tmp_path, monkeypatch):
    """Weights swapped on disk right after their hash was computed (a signed manifest pins
    that hash) are not what gets served: the hashed bytes are."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    original = load_bundle(bundle).model.state_dict()
    other = {k: (v + 1 if v.is_floating_point() else v).contiguous()
             for k, v in original.items()}
    real_sha256 = training.bundle.hashlib.sha256

    def sha256_then_swap(*data):
        digest = real_sha256(*data)
        save_file(other, str(bundle / "model.safetensors"))
        return digest

    monkeypatch.setattr(training.bundle.hashlib, "sha256", sha256_then_swap)
    loaded = load_bundle(bundle).model.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_export_never_leaves_a_half_written_bundle(tiny_bundle, tmp_path):
    out = make_bundle(tmp_path / "out", seed=1)
    before = file_sha256(out / "model.safetensors")
    bundle = load_bundle(out)
    manifest = bundle.manifest.model_dump(exclude={"weights", "created"})
    manifest["featurenorm"]["selected_block"] = "nope"
    with pytest.raises(ValueError, match="not among taps"):
        export_bundle(out, bundle.model, manifest)
    with pytest.raises(ValueError, match="inside the bundle"):
        export_bundle(out, bundle.model, bundle.manifest.model_dump(exclude={"weights", "created"}),
                      files={"../escape.txt": "x"})
    assert file_sha256(out / "model.safetensors") == before  # the old bundle is intact
    assert load_bundle(out).manifest.version == "0.0.1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directories left


def test_evaluate_cli_rejects_bad_bundles_and_ood_folders(tiny_bundle, tmp_path, capsys):
    assert cli_main(["evaluate", "--bundle", str(tmp_path / "none"), "--id", "x",
                     "--ood", "a=b"]) == 2
    assert "bundle directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    ok_id = tmp_path / "id"
    for i, cls in enumerate(load_bundle(tiny_bundle).manifest.classes):
        (ok_id / cls).mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(ok_id / cls / "a.png")
    code = cli_main(["evaluate", "--bundle", str(tiny_bundle), "--id", str(ok_id),
                     "--ood", f"mine={empty}"])
    assert code == 2 and str(empty) in capsys.readouterr().err
    (empty / "bad.jpg").write_bytes(b"not a jpeg")
    code = cli_main(["evaluate", "--bundle", str(tiny_bundle), "--id", str(ok_id),
                     "--ood", f"mine={empty}"])
    assert code == 2 and "unreadable image" in capsys.readouterr().err
    code = cli_main(["evaluate", "--bundle", str(tiny_bundle), "--id", str(ok_id),
                     "--ood", "noise=synthetic:gaussian:40", "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["selected_block"] == "layer2.2"  # the bundle's choice, not re-selected
    assert 0 <= report["ood"]["noise"]["featurenorm"]["auroc"] <= 1


# ---------------------------------------------------------------- the pipeline


def test_one_config_goes_to_a_bundle_that_scores_like_training(tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data, tmp_path / "run", "train.epochs=1", "train.max_steps_per_epoch=2",
        f"evaluation.id_test={tiny_data['id']}",
        "evaluation.ood={{noise: 'synthetic:uniform:48', tin: '{}'}}".format(tiny_data["aux"]),
        "evaluation.profile_ood=tin",
        f"evaluation.baselines={{before: '{RESNET20}'}}", "evaluation.selection_images=40",
        f"export.dir={tmp_path / 'bundle'}", "export.name=tiny", f"export.notice={NOTICE}")
    train(cfg)
    out = export_run(cfg, "python -m training build --config tiny.yaml")
    bundle = load_bundle(out)
    m = bundle.manifest
    ratios = m.featurenorm.norm_ratios
    assert m.featurenorm.selected_block == max(ratios, key=ratios.get)
    assert list(ratios) == bundle.model.block_names
    assert m.taps == [m.featurenorm.selected_block]
    assert set(m.evaluation["ood"]) == {"noise", "tin"}
    assert set(m.evaluation["baselines"]) == {"before"}
    assert m.provenance["pretrained"]["sha256"] == file_sha256(RESNET20)
    # the thresholds keep the requested TPR on the calibration (held-out) images
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert m.calibration["energy"].quantiles.count == len(run["split"]["val_indices"])
    for name in ("report.json", "report.md", "README.md", "NOTICE", "plots/blocks.svg",
                 "plots/roc_tin.svg", "plots/hist_featurenorm.svg"):
        assert (out / name).is_file(), name
    assert "python -m training build --config tiny.yaml" in (out / "README.md").read_text()
    # training's weights and the bundle give identical scores for the same images
    trained = build_model("resnet20", num_classes=10)
    load_weights(trained, tmp_path / "run" / "model.safetensors")
    images = open_dataset(str(tiny_data["id"]), labeled=True,
                          transform=m.preprocessing.eval_transform())
    a = score_dataset(trained.eval(), images, torch.device("cpu"), taps=m.taps)
    b = score_dataset(bundle.model, images, torch.device("cpu"), taps=m.taps)
    np.testing.assert_array_equal(a.pred, b.pred)
    for d in SERVED:
        np.testing.assert_array_equal(a.of(d, m.featurenorm.selected_block),
                                      b.of(d, m.featurenorm.selected_block))
    report = json.loads((out / "report.json").read_text())
    acc = report["models"]["this model"]["id_accuracy"]
    assert acc == pytest.approx(float((a.pred == a.label).mean()))


@pytest.mark.parametrize("soup", [False, True], ids=["run", "soup"])
def test_export_interpolation_exports_and_evaluates_the_mixed_weights(tiny_data, tmp_path, soup):
    other = tmp_path / "other.safetensors"  # another "run" of the same network
    torch.manual_seed(1)
    save_file(build_model("resnet20", num_classes=10).state_dict(), str(other))
    cfg = tiny_config(
        tiny_data, tmp_path / "run", "train.epochs=1", "train.max_steps_per_epoch=2",
        "optim.lr=0.05", f"evaluation.id_test={tiny_data['id']}",
        "evaluation.ood={noise: 'synthetic:uniform:16'}", "evaluation.profile_ood=noise",
        "evaluation.selection_images=16", "evaluation.baselines={}",
        f"export.dir={tmp_path / 'bundle'}", "export.interpolation=0.5",
        *([f"export.average_with=[{other}]"] if soup else []))
    train(cfg)
    out = export_run(cfg)
    start, run = build_model("resnet20", num_classes=10), build_model("resnet20", num_classes=10)
    load_weights(start, RESNET20)
    load_weights(run, tmp_path / "run" / "model.safetensors")
    end = {k: v.clone() for k, v in run.state_dict().items()}
    if soup:
        load_weights(run, other)
        end = {k: (v.double() + run.state_dict()[k].double()).div(2).to(v.dtype)
               if v.is_floating_point() else v for k, v in end.items()}
    want = interpolate_states(start.state_dict(), end, 0.5)
    bundle = load_bundle(out)
    got = bundle.model.state_dict()
    assert not torch.equal(want["linear.weight"], end["linear.weight"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert bundle.manifest.training["export"]["interpolation"] == 0.5
    md = (out / "report.md").read_text()
    assert "0.5 x `" in md
    assert ("export.average_with: a model soup" in md) == soup
    assert ("average_with[0]" in bundle.manifest.provenance) == soup
    # the report's accuracy is the mixed model's
    images = open_dataset(str(tiny_data["id"]), labeled=True,
                          transform=bundle.manifest.preprocessing.eval_transform())
    s = score_dataset(bundle.model, images, torch.device("cpu"))
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["this model"]["id_accuracy"] == pytest.approx(
        float((s.pred == s.label).mean()))
    with pytest.raises(ConfigError, match="set model.pretrained"):
        tiny_config(tiny_data, tmp_path / "x", "model.pretrained=null", "export.interpolation=0.5")


def test_average_command_writes_the_mean_of_weights_files(tmp_path, capsys):
    states = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        states.append(build_model("resnet20", num_classes=10).state_dict())
        save_file(states[-1], str(tmp_path / f"w{seed}.safetensors"))
    files = [str(tmp_path / f"w{seed}.safetensors") for seed in (1, 2, 3)]
    out = tmp_path / "soup" / "mean.safetensors"
    assert cli_main(["average", *files, "--out", str(out)]) == 0
    model = build_model("resnet20", num_classes=10)
    load_weights(model, out)
    key = "layer2.1.conv1.weight"
    torch.testing.assert_close(model.state_dict()[key], sum(s[key] for s in states) / 3)
    capsys.readouterr()
    assert cli_main(["average", files[0], "--out", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err
    assert cli_main(["average", *files, "--out", str(tmp_path / "mean.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
    torch.manual_seed(4)
    c100 = str(tmp_path / "c100.safetensors")
    save_file(build_model("resnet20", num_classes=100).state_dict(), c100)
    assert cli_main(["average", files[0], c100, "--out", str(out)]) == 2
    assert re.search(r"linear\.(weight|bias): shape .* in weight set 1 vs .* in 2",
                     capsys.readouterr().err)


def test_calibrate_score_records_direction_and_count():
    c = calibrate_score(np.arange(100.0), higher_is_id=True, tpr=0.9)
    assert c.higher_is_id and c.quantiles.higher_is_id and c.quantiles.count == 100
    assert c.threshold == pytest.approx(9.9)
