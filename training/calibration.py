"""Thresholds from held-out ID scores, and the quantile table that moves them at request time.

A threshold is calibrated to keep a true-positive rate (ID positive, as in FPR95): at
``tpr = 0.95``, 95% of held-out ID images fall on the in-distribution side. Which side that
is follows the score's direction (``higher_is_id`` in :mod:`training.detectors`):

* lower is ID (energy): the image is OOD when ``score > threshold``; the threshold is the
  ``tpr`` quantile of the ID scores;
* higher is ID (FeatureNorm, MSP): OOD when ``score < threshold``; the threshold is the
  ``1 - tpr`` quantile.

A score equal to the threshold counts as in-distribution either way.

The bundle also stores a table of ID score quantiles on a fine grid of probabilities, so a
client can ask the service for another TPR without the validation images: the threshold is
read off the table by linear interpolation (:func:`threshold_for_tpr`). At a grid
probability the table and :func:`calibrate` agree exactly; between grid points the
interpolation error is below the score spacing of neighbouring ID images.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# 0, 0.001, ..., 1: TPRs to a tenth of a percent without storing every validation score.
GRID_STEPS = 1000


class QuantileTable(BaseModel):
    """ID score quantiles: ``values[i]`` is the ``probabilities[i]`` quantile of the scores."""

    model_config = ConfigDict(extra="forbid")

    higher_is_id: bool
    count: int = Field(..., ge=1, description="number of ID images the table was made from")
    probabilities: list[float]
    values: list[float]

    @model_validator(mode="after")
    def _check(self) -> QuantileTable:
        p, v = self.probabilities, self.values
        if len(p) != len(v) or len(p) < 2:
            raise ValueError("probabilities and values must have the same length (>= 2)")
        if p[0] != 0.0 or p[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(p)):
            raise ValueError("probabilities must rise strictly from 0 to 1")
        if not all(math.isfinite(x) for x in v) or any(b < a for a, b in itertools.pairwise(v)):
            raise ValueError("values must be finite and non-decreasing")
        return self


def quantile_table(scores: np.ndarray, higher_is_id: bool,
                   steps: int = GRID_STEPS) -> QuantileTable:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("calibration needs a non-empty set of finite ID scores")
    probs = np.linspace(0.0, 1.0, steps + 1)
    values = np.quantile(scores, probs)
    return QuantileTable(higher_is_id=higher_is_id, count=int(scores.size),
                         probabilities=probs.tolist(), values=values.tolist())


class ScoreCalibration(BaseModel):
    """Threshold of one score, calibrated on held-out ID images, and their quantiles."""

    model_config = ConfigDict(extra="forbid")

    higher_is_id: bool
    tpr: float = Field(..., gt=0.0, le=1.0, description="ID true-positive rate kept")
    threshold: float
    quantiles: QuantileTable

    @model_validator(mode="after")
    def _direction(self) -> ScoreCalibration:
        if self.quantiles.higher_is_id != self.higher_is_id:
            raise ValueError("quantiles.higher_is_id disagrees with higher_is_id")
        return self


def _check_tpr(tpr: float) -> None:
    if not (math.isfinite(tpr) and 0.0 < tpr <= 1.0):
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")


def calibrate(scores: np.ndarray, higher_is_id: bool, tpr: float) -> float:
    """The threshold that keeps ``tpr`` of these ID scores on the in-distribution side."""
    _check_tpr(tpr)
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.quantile(scores, 1.0 - tpr if higher_is_id else tpr))


def threshold_for_tpr(table: QuantileTable, tpr: float) -> float:
    """The threshold for ``tpr``, interpolated from the stored quantiles."""
    _check_tpr(tpr)
    q = 1.0 - tpr if table.higher_is_id else tpr
    return float(np.interp(q, table.probabilities, table.values))


def is_ood(scores: np.ndarray, threshold: float, higher_is_id: bool) -> np.ndarray:
    """Elementwise OOD decision; equality with the threshold is in-distribution."""
    scores = np.asarray(scores)
    return scores < threshold if higher_is_id else scores > threshold


def calibrate_score(scores: np.ndarray, higher_is_id: bool, tpr: float) -> ScoreCalibration:
    """Threshold at ``tpr`` and the quantile table, from one score's held-out ID values."""
    return ScoreCalibration(higher_is_id=higher_is_id, tpr=tpr,
                            threshold=calibrate(scores, higher_is_id, tpr),
                            quantiles=quantile_table(scores, higher_is_id))
