"""Which thresholds and which rule decide "out of distribution" for one request.

The bundle's calibrated thresholds are the default. A client may replace a detector's
threshold directly, or ask for a target ID true-positive rate, which is turned into
thresholds with the bundle's ID quantile tables (:func:`training.calibration.threshold_for_tpr`).
A threshold given directly wins over ``tpr`` for that detector. The decisions themselves
come from :func:`training.calibration.is_ood`, so ties and directions match training. Every
served detector (:data:`training.detectors.SERVED`) gets a threshold and a decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.schemas import ThresholdSource
from training.bundle import Manifest
from training.calibration import ScoreCalibration, is_ood, threshold_for_tpr
from training.detectors import SERVED_NAMES, DecisionRule


@dataclass(frozen=True)
class Threshold:
    value: float
    source: ThresholdSource
    tpr: float | None
    higher_is_id: bool

    def is_ood(self, score: float) -> bool:
        return bool(is_ood(score, self.value, self.higher_is_id))


@dataclass(frozen=True)
class Decisions:
    """Each served detector's decision (by name) and the rule's combined one."""

    ood: dict[str, bool]
    combined: bool


@dataclass(frozen=True)
class Policy:
    """A threshold per served detector and the rule that combines their decisions."""

    thresholds: dict[str, Threshold]
    decision: DecisionRule

    def decide(self, scores: Mapping[str, float]) -> Decisions:
        """The decisions for one image's served scores (by detector name)."""
        ood = {name: t.is_ood(scores[name]) for name, t in self.thresholds.items()}
        if self.decision == "any":
            combined = any(ood.values())
        elif self.decision == "all":
            combined = all(ood.values())
        else:
            combined = ood[self.decision]
        return Decisions(ood, combined)


def _threshold(cal: ScoreCalibration, explicit: float | None, tpr: float | None) -> Threshold:
    if explicit is not None:
        return Threshold(float(explicit), "request", None, cal.higher_is_id)
    if tpr is not None:
        return Threshold(threshold_for_tpr(cal.quantiles, tpr), "tpr", tpr, cal.higher_is_id)
    return Threshold(cal.threshold, "bundle", cal.tpr, cal.higher_is_id)


def resolve_policy(manifest: Manifest, thresholds: Mapping[str, float] | None = None, *,
                   tpr: float | None = None, decision: DecisionRule | None = None) -> Policy:
    """The policy for a request's parameters (all optional; the bundle fills the rest):
    ``thresholds`` given directly by detector name, a target ``tpr`` for the others, the
    rule."""
    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - set(SERVED_NAMES)
    if unknown:
        raise ValueError(f"no served detector named {sorted(unknown)}; served: "
                         f"{list(SERVED_NAMES)}")
    cal = manifest.calibration
    return Policy({name: _threshold(cal[name], thresholds.get(name), tpr)
                   for name in SERVED_NAMES},
                  decision=decision or manifest.default_decision)
