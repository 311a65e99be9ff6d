"""Evaluate a model as the bundle will serve it, and write what a person reads.

:func:`evaluate_model` selects the FeatureNorm block (NormRatio on ID training images),
scores the ID test set and every OOD set in one forward pass per batch with every block
tapped, and measures every detector of :data:`training.detectors.DETECTORS` (``msp``,
``max_logit`` and ``energy`` on the logits; ``featurenorm`` at the selected block and
``featurenorm_last`` at the last one, the naive choice selection is compared against) with
:func:`training.metrics.ood_metrics` (FPR95 with ID positive, AUROC, AUPR-In/Out), plus
ID accuracy and the AUROC of FeatureNorm at every block (for the block profile plot).
:func:`markdown`, :func:`operating_point_markdown` and :func:`figures` turn results into what
``report.md`` and ``plots/`` hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training import plots
from training.block_selection import norm_ratios, select_block
from training.calibration import is_ood
from training.detectors import BY_NAME, DETECTORS, FEATURENORM, Detector
from training.evaluation import DetectorScores, score_dataset
from training.metrics import ood_metrics, roc_curve
from training.models import TappedClassifier

METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")


@dataclass
class ModelResult:
    """The numbers of one model; ``scores`` (per set, per detector) stay out of the JSON."""

    name: str
    selected_block: str
    last_block: str
    norm_ratios: dict[str, float]
    id_accuracy: float
    ood: dict[str, dict[str, dict[str, float]]]
    block_auroc: dict[str, dict[str, float]]
    scores: dict[str, dict[str, np.ndarray]] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"selected_block": self.selected_block, "last_block": self.last_block,
                "norm_ratios": self.norm_ratios, "id_accuracy": self.id_accuracy,
                "ood": self.ood, "featurenorm_auroc_per_block": self.block_auroc}

    def block_of(self, detector: Detector) -> str | None:
        """The block ``detector`` reads in this model (None: the logits)."""
        return detector.block_name(self.selected_block, self.last_block)


def _detector_scores(raw: DetectorScores, selected: str, last: str) -> dict[str, np.ndarray]:
    return {d.name: raw.of(d, selected, last) for d in DETECTORS}


def evaluate_model(name: str, model: TappedClassifier, *, id_test: Dataset,
                   ood_sets: dict[str, Dataset], device: torch.device,
                   selection_set: Dataset | None = None, seed: int = 0,
                   batch_size: int = 256, num_workers: int = 0,
                   selected_block: str | None = None,
                   ratios: dict[str, float] | None = None) -> ModelResult:
    """Select the block on ``selection_set`` (unless ``selected_block`` and its ``ratios``
    are given, e.g. by a bundle) and measure."""
    blocks = model.block_names
    kw = {"batch_size": batch_size, "num_workers": num_workers}
    if selected_block is None:
        if selection_set is None:
            raise ValueError("block selection needs ID training images (selection_set)")
        ratios = norm_ratios(model, selection_set, device, blocks, seed=seed, **kw)
        selected_block = select_block(ratios)
    last = blocks[-1]
    raw_id = score_dataset(model, id_test, device, taps=blocks, desc=f"{name}: ID test", **kw)
    accuracy = float((raw_id.pred == raw_id.label).mean())
    scores = {"id": _detector_scores(raw_id, selected_block, last)}
    ood, per_block = {}, {}
    for set_name, dataset in ood_sets.items():
        raw = score_dataset(model, dataset, device, taps=blocks, desc=f"{name}: {set_name}",
                            **kw)
        scores[set_name] = _detector_scores(raw, selected_block, last)
        ood[set_name] = {d.name: ood_metrics(scores["id"][d.name], scores[set_name][d.name],
                                             d.higher_is_id) for d in DETECTORS}
        per_block[set_name] = {
            b: ood_metrics(raw_id.of(FEATURENORM, b), raw.of(FEATURENORM, b),
                           FEATURENORM.higher_is_id)["auroc"] for b in blocks}
    return ModelResult(name, selected_block, last, dict(ratios or {}), accuracy, ood,
                       per_block, scores)


def operating_point(result: ModelResult, thresholds: dict[str, float],
                    default_decision: str = "any") -> dict[str, Any]:
    """What the service will do at ``thresholds`` (the served detectors' thresholds, e.g. a
    bundle's calibrated ones): the share of ID test images accepted and of each OOD set
    rejected, per detector and for the rules that combine them (``any``: OOD when either
    detector says so; ``all``: when both do), the same decisions as the service's
    ``Policy.decide`` (both go through :func:`training.calibration.is_ood`)."""
    def flags(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {d: is_ood(scores[d], t, BY_NAME[d].higher_is_id) for d, t in thresholds.items()}
        stacked = np.stack(list(out.values()))
        return out | {"any": stacked.any(axis=0), "all": stacked.all(axis=0)}

    id_flags = flags(result.scores["id"])
    return {"thresholds": dict(thresholds), "default_decision": default_decision,
            "id_accepted": {k: float(1 - v.mean()) for k, v in id_flags.items()},
            "ood_rejected": {s: {k: float(v.mean()) for k, v in flags(scores).items()}
                             for s, scores in result.scores.items() if s != "id"}}


def operating_point_markdown(op: dict[str, Any], heading: str) -> str:
    """The operating point as a table: one row per detector or rule, the default marked."""
    sets = list(op["ood_rejected"])
    lines = [f"## {heading}", "",
             "Thresholds: " + ", ".join(f"{d} {t:.4f}" for d, t in op["thresholds"].items())
             + f". Default decision rule: `{op['default_decision']}`.", "",
             "| decision | ID accepted % | " + " | ".join(f"{s} rejected %" for s in sets)
             + " |", "|---|---|" + "---|" * len(sets)]
    for key, accepted in op["id_accepted"].items():
        label = f"**{key} (default)**" if key == op["default_decision"] else key
        lines.append(f"| {label} | {_pct(accepted)} | " + " | ".join(
            _pct(op["ood_rejected"][s][key]) for s in sets) + " |")
    return "\n".join(lines) + "\n"


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def selection_verdict(result: ModelResult) -> str:
    """Whether block selection beat the naive last block, in words and numbers."""
    if result.selected_block == result.last_block:
        return (f"NormRatio selected the last block ({result.last_block}) itself, so block "
                "selection gains nothing over the last block for this model.")
    sets = list(result.ood)
    fpr = {d: np.mean([result.ood[s][d]["fpr95"] for s in sets])
           for d in ("featurenorm", "featurenorm_last")}
    auroc = {d: np.mean([result.ood[s][d]["auroc"] for s in sets])
             for d in ("featurenorm", "featurenorm_last")}
    better = auroc["featurenorm"] > auroc["featurenorm_last"]
    return (f"{result.selected_block} {'beats' if better else 'does not beat'} the last block "
            f"({result.last_block}): mean AUROC {_pct(auroc['featurenorm'])}% vs "
            f"{_pct(auroc['featurenorm_last'])}%, mean FPR95 {_pct(fpr['featurenorm'])}% vs "
            f"{_pct(fpr['featurenorm_last'])}% over {len(sets)} OOD sets.")


def markdown(results: list[ModelResult], title: str, notes: list[str] = ()) -> str:
    """One table per OOD set: every model x detector, FPR95 / AUROC / AUPR-In / AUPR-Out."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| model | ID accuracy % | FeatureNorm block (NormRatio) |", "|---|---|---|"]
    for r in results:
        ratio = r.norm_ratios.get(r.selected_block)
        lines.append(f"| {r.name} | {_pct(r.id_accuracy)} | {r.selected_block}"
                     + (f" ({ratio:.3f})" if ratio is not None else "") + " |")
    ood_names = list(results[0].ood)
    lines += ["", "FeatureNorm at the selected block vs at the last block:", ""]
    lines += [f"- {r.name}: {selection_verdict(r)}" for r in results]
    for set_name in ood_names:
        lines += ["", f"## {set_name}", "",
                  "| model | detector | FPR95 % ↓ | AUROC % ↑ | AUPR-In % ↑ | AUPR-Out % ↑ |",
                  "|---|---|---|---|---|---|"]
        for r in results:
            for d in DETECTORS:
                m = r.ood[set_name][d.name]
                block = r.block_of(d)
                label = d.name if block is None else f"{d.name} ({block})"
                lines.append(f"| {r.name} | {label} | " + " | ".join(
                    _pct(m[k]) for k in METRIC_NAMES) + " |")
    if len(ood_names) > 1:
        lines += ["", "## Mean over OOD sets", "", "| model | detector | FPR95 % ↓ | AUROC % ↑ |",
                  "|---|---|---|---|"]
        for r in results:
            for d in DETECTORS:
                f = np.mean([r.ood[s][d.name]["fpr95"] for s in ood_names])
                a = np.mean([r.ood[s][d.name]["auroc"] for s in ood_names])
                lines.append(f"| {r.name} | {d.name} | {_pct(f)} | {_pct(a)} |")
    return "\n".join(lines) + "\n"


def figures(result: ModelResult, profile_set: str,
            thresholds: dict[str, float] | None = None) -> dict[str, str]:
    """SVG files (relative path -> text) for one model's result."""
    thresholds = thresholds or {}
    out = {}
    ood_names = [s for s in result.scores if s != "id"]
    for d in DETECTORS:
        block = result.block_of(d)
        xlabel = d.title + ("" if block is None else f" at {block}") + f" ({d.direction})"
        series = {"ID test": result.scores["id"][d.name]}
        series |= {s: result.scores[s][d.name] for s in ood_names}
        marker = ("threshold", thresholds[d.name]) if d.name in thresholds else None
        out[f"plots/hist_{d.name}.svg"] = plots.histograms(series, f"{d.name}: ID vs OOD",
                                                           xlabel, marker=marker)
    for s in ood_names:
        curves = {d.name: roc_curve(result.scores["id"][d.name], result.scores[s][d.name],
                                    d.higher_is_id) for d in DETECTORS}
        out[f"plots/roc_{s}.svg"] = plots.roc_curves(curves, f"ROC: ID test vs {s}")
    if result.norm_ratios:
        out["plots/blocks.svg"] = plots.block_profile(
            list(result.norm_ratios), result.norm_ratios, result.block_auroc[profile_set],
            result.selected_block, profile_set)
    return out
