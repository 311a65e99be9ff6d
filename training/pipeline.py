"""From a finished training run to a served bundle: select, evaluate, calibrate, export.

``python -m training build --config F`` trains (or resumes) and then runs :func:`export_run`;
``python -m training export --config F`` runs only the second half on a finished run. The
steps, each on data the previous ones did not touch:

0. **Choice of the weights** (with ``export.interpolation_candidates``): the interpolation
   between the starting and the fine-tuned weights, on validation data only (held-out ID
   images and outliers training never saw), before any test set is opened
   (:mod:`training.model_choice`).
1. **Block selection** on ID *training* images (outside the held-out split), jigsaw vs plain.
2. **Calibration** of the served detectors' thresholds (energy and FeatureNorm,
   :data:`training.detectors.SERVED`) on the held-out ID *validation* split, at
   ``evaluation.tpr``, plus their quantile tables.
3. **Evaluation** on the ID *test* set and the OOD test sets of the config, for the trained
   model and for each baseline (e.g. the network before fine-tuning), each baseline with its
   own selected block; the served operating point on the test sets (what the calibrated
   thresholds accept and reject, per detector and per decision rule).
4. **Export**: weights, manifest, report (JSON, Markdown, SVG figures), README and licence
   notice in one bundle directory. With ``export.average_with`` the weights that are
   evaluated and exported are the mean of the run's and those other runs'; with
   ``export.interpolation`` they are then mixed with the run's starting weights
   (:mod:`training.weight_interpolation`).
"""

from __future__ import annotations

import json
import platform
import shlex
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from training.bundle import export_bundle
from training.calibration import calibrate_score
from training.config import ConfigError, RunConfig
from training.data.archives import source_provenance
from training.data.sampling import stratified_split
from training.data.sources import open_dataset, open_unlabelled
from training.detectors import DETECTORS, SERVED
from training.evaluation import score_dataset
from training.model_choice import choose_interpolation
from training.models import build_model, load_state, load_weights
from training.progress import step
from training.report import (
    ModelResult,
    evaluate_model,
    figures,
    markdown,
    operating_point,
    operating_point_markdown,
)
from training.runtime import select_device
from training.trainer import aux_split
from training.weight_interpolation import average_states, interpolate_states

RESULT_NAME = "this model"


def _summary(result: ModelResult) -> dict[str, Any]:
    return {"id_accuracy": result.id_accuracy,
            "ood": result.ood}


def _readme(cfg: RunConfig, name: str, command: str, md_head: str) -> str:
    return "\n".join([
        f"# {name}", "",
        (f"`{cfg.model.name}` trained as `{cfg.loss.mode}` by oodserve. Load it with "
        "`training.bundle.load_bundle` or serve it with the service; see `manifest.json`."), "",
        "## Reproduce", "", "From the repository root:", "", "```", command, "```", "",
        f"It starts from `{cfg.model.pretrained}`; when that file is the output of another "
        "run (such as a first training stage), run that stage's config first."
        if cfg.model.pretrained else "It trains from scratch.", "",
        "## Results", "",
        ("`report.md` has every table, `report.json` the same numbers, `plots/` the figures "
        "(score histograms, ROC curves per OOD set, NormRatio vs per-block AUROC)."), "",
        md_head, "",
        "## Data and licences", "",
        ("Data provenance (sources and sha256) is in `manifest.json` under `provenance`. "
        "`NOTICE`, when present, is the licence notice of the initial weights."), ""])


def selection_indices(cfg: RunConfig, train_idx: list[int]) -> list[int]:
    """The ID training images FeatureNorm's block is selected on: all of ``train_idx``, or a
    seeded random ``evaluation.selection_images`` of them (``train_idx`` is sorted, and so
    grouped by class in class-ordered sources: its first images would be a few classes)."""
    limit = cfg.evaluation.selection_images
    if not limit or limit >= len(train_idx):
        return list(train_idx)
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed))
    return sorted(train_idx[i] for i in pick[:limit].tolist())


def aux_validation_set(cfg: RunConfig, run: dict[str, Any]) -> Subset | None:
    """The auxiliary outliers the run never trained on, checked against its ``run.json``;
    None without an auxiliary set or a held-out share of it."""
    if not (cfg.data.aux and cfg.data.aux_val_fraction > 0):
        return None
    aux = open_unlabelled({"aux": cfg.data.aux}, cfg.data.preprocessing,
                          cfg.data.cache_dir)["aux"]
    held = aux_split(len(aux), cfg)[1]
    recorded = run.get("aux_split", {}).get("val_indices")
    if recorded and recorded != held:
        raise ConfigError(f"{cfg.run_dir}/run.json holds another auxiliary validation "
                          "split than the config gives; was the data or config changed?")
    if run.get("config", {}).get("loss", {}).get("mode", "ce") != "ce" and not recorded:
        raise ConfigError(f"{cfg.run_dir} trained on every auxiliary outlier (no "
                          "aux_split in run.json): there are no unseen ones to choose on")
    return Subset(aux, held)


def validation_ood_sets(cfg: RunConfig, run: dict[str, Any]) -> dict[str, Any]:
    """The outlier sets model choices are judged on: the auxiliary outliers the run never
    trained on (``aux-val``) and ``evaluation.validation_ood``."""
    held = aux_validation_set(cfg, run)
    return ({} if held is None else {"aux-val": held}) | open_unlabelled(
        cfg.evaluation.validation_ood, cfg.data.preprocessing, cfg.data.cache_dir)


def export_run(cfg: RunConfig, command: str = "") -> Path:
    """Turn the finished run of ``cfg`` into a bundle; returns the bundle directory."""
    ev, run_dir = cfg.evaluation, Path(cfg.run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{weights} not found: train the run first (python -m training "
                          "train/build --config ...)")
    if not ev.id_test or not ev.ood:
        raise ConfigError("evaluation.id_test and evaluation.ood must be set to build a bundle")
    if cfg.data.val_fraction == 0:
        raise ConfigError("data.val_fraction must be > 0: thresholds are calibrated on it")
    run = json.loads((run_dir / "run.json").read_text())
    pre = cfg.data.preprocessing
    tf = pre.eval_transform()
    cache = cfg.data.cache_dir
    full = open_dataset(cfg.data.train, labeled=True, transform=tf, cache_dir=cache)
    train_idx, val_idx = stratified_split(full.targets, cfg.data.val_fraction, cfg.seed)
    if val_idx != run["split"]["val_indices"]:
        raise ConfigError(f"{run_dir}/run.json holds another validation split than the config "
                          "gives; was the data or config changed after training?")
    selection, val = Subset(full, selection_indices(cfg, train_idx)), Subset(full, val_idx)
    device = select_device(cfg.train.device)
    options = {"num_classes": len(run["classes"]), **cfg.model.options}
    score_kw = {"batch_size": cfg.train.eval_batch_size, "num_workers": cfg.data.num_workers}

    def load(path) -> torch.nn.Module:
        model = build_model(cfg.model.name, **options)
        load_weights(model, path)
        return model.to(device).eval()

    model = load(weights)
    if cfg.export.average_with:
        soup = average_states([load(p).state_dict() for p in cfg.export.average_with]
                              + [model.state_dict()])
        load_state(model, soup, source=f"the mean of {weights} and export.average_with")
    alpha, choice = cfg.export.interpolation, None
    if cfg.export.interpolation_candidates:
        # Before any test set is opened: the choice sees validation data only.
        step(f"choosing the interpolation among {cfg.export.interpolation_candidates} on "
             "validation data")
        choice = choose_interpolation(
            model, load(cfg.model.pretrained).state_dict(),
            {k: v.clone() for k, v in model.state_dict().items()},
            cfg.export.interpolation_candidates, val_id=val,
            val_ood=validation_ood_sets(cfg, run), max_drop=cfg.export.max_accuracy_drop,
            device=device, **score_kw)
        alpha = choice.chosen.alpha
    elif alpha is not None:
        start = load(cfg.model.pretrained).state_dict()
        mixed = interpolate_states(start, model.state_dict(), alpha)
        load_state(model, mixed, source=f"{cfg.model.pretrained} x {weights}")

    id_test = open_dataset(ev.id_test, labeled=True, transform=tf, cache_dir=cache)
    if list(id_test.classes) != run["classes"]:
        raise ConfigError(f"{ev.id_test} has classes {list(id_test.classes)}, the model "
                          f"{run['classes']}")
    ood_sets = open_unlabelled(ev.ood, pre, cache)
    kw = {"selection_set": selection, "id_test": id_test, "ood_sets": ood_sets,
          "device": device, "seed": cfg.seed, **score_kw}
    step(f"selecting the FeatureNorm block on {len(selection)} training images, then "
         f"scoring the test sets ({len(id_test)} ID, {len(ood_sets)} OOD sets)")
    result = evaluate_model(RESULT_NAME, model, **kw)
    sel = result.selected_block
    val_scores = score_dataset(model, val, device, taps=[sel], desc="calibration", **score_kw)
    calibration = {d.name: calibrate_score(val_scores.of(d, sel), d.higher_is_id, ev.tpr)
                   for d in SERVED}
    thresholds = {k: c.threshold for k, c in calibration.items()}
    op = operating_point(result, thresholds)
    if ev.baselines:
        step(f"evaluating the baselines {list(ev.baselines)} alike")
    baselines = [evaluate_model(name, load(path), **kw) for name, path in ev.baselines.items()]

    name = cfg.export.name or run_dir.name
    profile = ev.profile_ood or next(iter(ev.ood))
    notes = [f"ID test: `{ev.id_test}` ({len(id_test)} images); OOD: "
             + ", ".join(f"{n} `{s}` ({len(ood_sets[n])})" for n, s in ev.ood.items()),
             "ID is the positive class; FPR95 = share of OOD accepted at 95% ID TPR.",
             (f"FeatureNorm block chosen by NormRatio on {len(selection)} ID training images; "
             f"thresholds calibrated on {len(val)} held-out ID validation images at "
             f"TPR {ev.tpr:g}."),
             "Baselines: " + (", ".join(f"{n} = `{p}`" for n, p in ev.baselines.items())
                              or "none")]
    end = f"`{weights}`"
    if cfg.export.average_with:
        end = "the mean of " + ", ".join(f"`{p}`" for p in [weights, *cfg.export.average_with])
        notes.append(f"Fine-tuned weights: {end} (export.average_with: a model soup)")
    if alpha is not None:
        how = ("chosen on validation data, below" if choice else
               "export.interpolation")
        notes.append(f"Weights of this model: {1 - alpha:g} x `{cfg.model.pretrained}` + "
                     f"{alpha:g} x {end} (weight-space interpolation, WiSE-FT; {how})")
    md = markdown([result, *baselines], f"Evaluation of {name}", notes)
    md += "\n" + operating_point_markdown(op, "Served operating point on the test sets")
    if choice:
        md += "\n" + choice.markdown()
    report = {"id_test": ev.id_test, "ood": ev.ood, "tpr": ev.tpr,
              "selection_images": len(selection), "calibration_images": len(val),
              "detectors": [d.name for d in DETECTORS],
              "models": {r.name: r.to_json() for r in [result, *baselines]},
              "baselines": ev.baselines, "operating_point": op,
              "choice": choice.to_json() if choice else None}
    files = {"report.json": json.dumps(report, indent=1) + "\n", "report.md": md,
             "README.md": _readme(cfg, name, command or "python -m training build --config "
                                  "<config>", md.split("\n## ")[0])}
    files |= figures(result, profile, thresholds)
    notice = Path(cfg.export.notice).read_text() if cfg.export.notice else None
    manifest = {
        "name": name, "version": cfg.export.version,
        "architecture": {"name": cfg.model.name, "options": options},
        "classes": run["classes"],
        "preprocessing": pre.model_dump(mode="json"),
        "taps": [sel],
        "featurenorm": {"selected_block": sel, "norm_ratios": result.norm_ratios,
                        "selection": {"images": len(selection), "grid": 3, "seed": cfg.seed,
                                      "source": cfg.data.train}},
        "calibration": calibration,
        "evaluation": {"id_test": ev.id_test, "tpr": ev.tpr, **_summary(result),
                       "operating_point": op,
                       "choice": choice.to_json() if choice else None,
                       "baselines": {r.name: _summary(r) for r in baselines}},
        "training": cfg.model_dump(mode="json"),
        "provenance": {**source_provenance({"train": cfg.data.train, "aux": cfg.data.aux,
                                      "pretrained": cfg.model.pretrained,
                                      **{f"average_with[{i}]": w for i, w in
                                         enumerate(cfg.export.average_with)},
                                      "id_test": ev.id_test, **ev.ood}),
                       "val_indices_count": len(val_idx), "command": command,
                       "environment": {"torch": torch.__version__,
                                       "python": platform.python_version(),
                                       "device": str(device)}},
    }
    out = Path(cfg.export.dir or run_dir / "bundle")
    return export_bundle(out, model, manifest, notice=notice, files=files)


def command_line(argv: list[str]) -> str:
    return "python -m training " + shlex.join(argv)
