"""Which thresholds and which rule decide "out of distribution" for one request.

The bundle's calibrated thresholds are the default. A client may replace a detector's
threshold directly, or ask for a target ID true-positive rate, which is turned into
thresholds with the bundle's ID quantile tables (:func:`training.calibration.threshold_for_tpr`).
A threshold given directly wins over ``tpr`` for that detector. The decisions themselves
come from :func:`training.calibration.is_ood`, so ties and directions match training.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.schemas import ThresholdSource
from training.bundle import DecisionRule, Manifest
from training.calibration import ScoreCalibration, is_ood, threshold_for_tpr

DETECTORS = ("energy", "featurenorm")


@dataclass(frozen=True)
class Threshold:
    value: float
    source: ThresholdSource
    tpr: float | None
    higher_is_id: bool

    def is_ood(self, score: float) -> bool:
        return bool(is_ood(score, self.value, self.higher_is_id))


@dataclass(frozen=True)
class Policy:
    """Thresholds of both detectors and the rule that combines their decisions."""

    energy: Threshold
    featurenorm: Threshold
    decision: DecisionRule

    def decide(self, energy: float, featurenorm: float) -> tuple[bool, bool, bool]:
        """``(energy is OOD, featurenorm is OOD, combined decision)``."""
        e, f = self.energy.is_ood(energy), self.featurenorm.is_ood(featurenorm)
        combined = {"any": e or f, "all": e and f, "energy": e, "featurenorm": f}
        return e, f, combined[self.decision]


def _threshold(cal: ScoreCalibration, explicit: float | None, tpr: float | None) -> Threshold:
    if explicit is not None:
        return Threshold(float(explicit), "request", None, cal.higher_is_id)
    if tpr is not None:
        return Threshold(threshold_for_tpr(cal.quantiles, tpr), "tpr", tpr, cal.higher_is_id)
    return Threshold(cal.threshold, "bundle", cal.tpr, cal.higher_is_id)


def resolve_policy(manifest: Manifest, *, energy_threshold: float | None = None,
                   featurenorm_threshold: float | None = None, tpr: float | None = None,
                   decision: DecisionRule | None = None) -> Policy:
    """The policy for a request's parameters (all optional; the bundle fills the rest)."""
    cal = manifest.calibration
    return Policy(energy=_threshold(cal["energy"], energy_threshold, tpr),
                  featurenorm=_threshold(cal["featurenorm"], featurenorm_threshold, tpr),
                  decision=decision or manifest.default_decision)
