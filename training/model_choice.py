"""Choosing between candidate weights on validation data only.

A bundle's weights may be one of several candidates: the fine-tuned run, or the run mixed
with its starting weights at some interpolation ``a`` (:mod:`training.weight_interpolation`).
Picking among them by test-set figures makes those figures optimistic, so the choice here
sees only data that neither training nor the test report uses:

* **ID**: the held-out split of the ID training set (``data.val_fraction``), for accuracy and
  the 95%-TPR energy threshold;
* **outliers**: the auxiliary outliers training never saw (``data.aux_val_fraction``,
  :func:`training.trainer.aux_split`), plus ``evaluation.validation_ood`` (e.g. synthetic
  noise drawn with another seed than the test sets').

**The rule**, fixed before any candidate's test figures were looked at: among the candidates
whose held-out ID accuracy is at most ``export.max_accuracy_drop`` points below the starting
weights' (``model.pretrained``), take the one with the lowest mean energy FPR95 over the
validation outlier sets; ties go to the higher mean energy AUROC, then to the larger ``a``.
Energy is the score GReg trains, so it is the one the choice optimises; accuracy is a
constraint rather than a term in the objective so that the trade has one knob a person can
read. When no candidate is within the drop, the most accurate one is taken and the report
says so.

The held-out accuracy is a proxy for test accuracy: the drop relative to the start is what
the rule uses, not the level (the pretrained checkpoint may have seen the held-out images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from training.detectors import ENERGY
from training.evaluation import score_dataset
from training.metrics import ood_metrics
from training.models import TappedClassifier, load_state
from training.weight_interpolation import interpolate_states


@dataclass(frozen=True)
class Candidate:
    """One candidate's validation figures (fractions, not percent)."""

    alpha: float
    accuracy: float
    fpr95: dict[str, float]
    auroc: dict[str, float]

    @property
    def mean_fpr95(self) -> float:
        return float(np.mean(list(self.fpr95.values())))

    @property
    def mean_auroc(self) -> float:
        return float(np.mean(list(self.auroc.values())))


@dataclass(frozen=True)
class Choice:
    chosen: Candidate
    start_accuracy: float
    max_drop: float
    within_drop: bool
    candidates: list[Candidate]

    def to_json(self) -> dict:
        return {"rule": RULE, "alpha": self.chosen.alpha, "start_accuracy": self.start_accuracy,
                "max_accuracy_drop_points": self.max_drop, "within_drop": self.within_drop,
                "candidates": [{"alpha": c.alpha, "accuracy": c.accuracy, "fpr95": c.fpr95,
                                "auroc": c.auroc} for c in self.candidates]}

    def markdown(self) -> str:
        sets = list(self.chosen.fpr95)
        lines = ["## Choice of the weights (validation data only)", "", RULE, "",
                 (f"Starting weights' held-out accuracy: {100 * self.start_accuracy:.2f}%; "
                 f"allowed drop: {self.max_drop:g} points."), "",
                 "| a | held-out acc. % | " + " | ".join(f"{s} energy FPR95 / AUROC %"
                                                        for s in sets) + " | mean FPR95 % |",
                 "|---|---|" + "---|" * len(sets) + "---|"]
        for c in self.candidates:
            mark = " **(chosen)**" if c is self.chosen else ""
            lines.append(f"| {c.alpha:g}{mark} | {100 * c.accuracy:.2f} | " + " | ".join(
                f"{100 * c.fpr95[s]:.2f} / {100 * c.auroc[s]:.2f}" for s in sets)
                + f" | {100 * c.mean_fpr95:.2f} |")
        if not self.within_drop:
            lines += ["", ("No candidate stayed within the allowed drop: the most accurate one "
                          "was taken.")]
        return "\n".join(lines) + "\n"


RULE = ("Rule: among the candidates whose held-out ID accuracy is at most the allowed drop "
        "below the starting weights', the lowest mean energy FPR95 over the validation "
        "outlier sets; ties to the higher mean AUROC, then the larger a. Test sets are not "
        "read.")


def validate(model: TappedClassifier, val_id: Dataset, val_ood: dict[str, Dataset],
             device: torch.device, **kw) -> tuple[float, dict[str, float], dict[str, float]]:
    """Held-out accuracy and energy FPR95 / AUROC (ID positive) per validation outlier set."""
    ident = score_dataset(model, val_id, device, desc="choice: held-out ID", **kw)
    accuracy = float((ident.pred == ident.label).mean())
    fpr, auroc = {}, {}
    for name, dataset in val_ood.items():
        scored = score_dataset(model, dataset, device, desc=f"choice: {name}", **kw)
        m = ood_metrics(ident.of(ENERGY), scored.of(ENERGY), ENERGY.higher_is_id)
        fpr[name], auroc[name] = m["fpr95"], m["auroc"]
    return accuracy, fpr, auroc


def choose_interpolation(model: TappedClassifier, start: dict[str, torch.Tensor],
                         end: dict[str, torch.Tensor], alphas: list[float], *,
                         val_id: Dataset, val_ood: dict[str, Dataset], max_drop: float,
                         device: torch.device, **kw) -> Choice:
    """Score ``(1 - a) * start + a * end`` for each ``a`` on the validation sets and apply
    the rule. ``model`` is left holding the chosen weights."""
    if not alphas or not val_ood:
        raise ValueError("the choice needs candidates and at least one validation outlier set")
    load_state(model, start, source="the starting weights")
    start_accuracy = validate(model, val_id, {}, device, **kw)[0]
    candidates = []
    for a in sorted(set(alphas)):
        load_state(model, interpolate_states(start, end, a), source=f"interpolation a={a:g}")
        candidates.append(Candidate(a, *validate(model, val_id, val_ood, device, **kw)))
    floor = start_accuracy - max_drop / 100
    eligible = [c for c in candidates if c.accuracy >= floor]
    if eligible:
        chosen = min(eligible, key=lambda c: (c.mean_fpr95, -c.mean_auroc, -c.alpha))
    else:
        chosen = max(candidates, key=lambda c: (c.accuracy, c.alpha))
    load_state(model, interpolate_states(start, end, chosen.alpha),
               source=f"interpolation a={chosen.alpha:g}")
    return Choice(chosen, start_accuracy, max_drop, bool(eligible), candidates)
