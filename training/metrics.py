"""OOD detection metrics in plain numpy, with one stated convention.

numpy only, so that training, evaluation and the service need no scikit-learn at run time
(scikit-learn is the reference the tests cross-check against). Every metric comes from one
sort of the pooled scores, so 100k+ samples take milliseconds.

**ID is the positive class** (the classic Hendrycks/ODIN reading, which GReg's and
FeatureNorm's code use). A score is first turned into an *ID confidence*: kept as is when
higher means more ID, negated otherwise (``higher_is_id`` in :mod:`training.detectors`;
energy is negated). A sample is accepted as ID iff its confidence is >= the threshold, so
samples tied at a threshold cross it together.

* ``fpr95``: share of OOD samples accepted as ID at the largest threshold that still accepts
  >= 95% of ID. This equals scikit-learn's ``roc_curve(y_id, conf, drop_intermediate=False)``
  followed by ``fpr[np.searchsorted(tpr, 0.95, side="left")]``.
* ``fpr95_ood_positive``: OpenOOD v1.5's reading, reported so numbers can be compared: OOD is
  positive with score ``-conf``, and this is the share of ID samples flagged as OOD at the
  largest such threshold that catches >= 95% of OOD. Same tie semantics.
* ``auroc``: area under the ROC with ties counted half (Mann-Whitney U with mid-ranks); equal
  to scikit-learn's ``roc_auc_score`` and the same for either positive class.
* ``aupr_in`` / ``aupr_out``: *average precision* (step-wise: the precision at each distinct
  threshold weighted by the recall gained there), with ID resp. OOD positive, as in
  Hendrycks-style code and GReg's code and as scikit-learn's ``average_precision_score``.
  OpenOOD integrates the PR curve by trapezoids instead, so its AUPR numbers differ slightly.
"""

from __future__ import annotations

import numpy as np

TPR_LEVEL = 0.95


def _as_scores(scores, name: str) -> np.ndarray:
    """A 1-D, non-empty, finite float64 copy of ``scores`` (numpy array, sequence or tensor)."""
    if hasattr(scores, "detach"):  # a torch tensor: maybe on an accelerator, maybe bfloat16
        scores = scores.detach().cpu().double()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric scores: {exc}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite scores")
    return arr


def _counts_per_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many ``pos`` and ``neg`` scores equal each distinct score, highest score first.

    The one sort all metrics share: the distinct scores are exactly the thresholds at which
    the accepted set changes, and tied samples land in the same count.
    """
    values, which = np.unique(np.concatenate([pos, neg]), return_inverse=True)
    pos_counts = np.bincount(which[: pos.size], minlength=values.size)
    neg_counts = np.bincount(which[pos.size :], minlength=values.size)
    return pos_counts[::-1], neg_counts[::-1]


def _fpr_at_tpr(pos_counts: np.ndarray, neg_counts: np.ndarray, level: float) -> float:
    """FPR at the first (largest) threshold whose TPR reaches ``level``.

    TPR is computed as ``tp / P`` in floating point, exactly as scikit-learn's ROC does, so a
    level that falls exactly on a fraction such as 19/20 is matched the same way.
    """
    tps, fps = np.cumsum(pos_counts), np.cumsum(neg_counts)
    first = np.argmax(tps / tps[-1] >= level)
    return float(fps[first] / fps[-1])


def _auroc(pos_counts: np.ndarray, neg_counts: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2: each negative beats the positives above it, half a tie."""
    pos_above = np.cumsum(pos_counts) - pos_counts
    wins = np.sum(neg_counts * (pos_above + pos_counts / 2.0))
    return float(wins / (pos_counts.sum() * neg_counts.sum()))


def _average_precision(pos_counts: np.ndarray, neg_counts: np.ndarray) -> float:
    """Sum over thresholds of (recall gained there) x (precision there)."""
    tps, fps = np.cumsum(pos_counts), np.cumsum(neg_counts)
    return float(np.sum(pos_counts / tps[-1] * tps / (tps + fps)))


def ood_metrics(id_scores, ood_scores, higher_is_id: bool) -> dict[str, float]:
    """FPR95 (both readings), AUROC, AUPR-In and AUPR-Out of one detector on one ID/OOD pair.

    ``higher_is_id`` gives the score's direction (its detector's, :mod:`training.detectors`);
    the metrics are then independent of it. Raises ``ValueError`` for empty, non-1-D or
    non-finite scores.
    """
    id_conf = _as_scores(id_scores, "id_scores")
    ood_conf = _as_scores(ood_scores, "ood_scores")
    if not higher_is_id:
        id_conf, ood_conf = -id_conf, -ood_conf
    id_counts, ood_counts = _counts_per_threshold(id_conf, ood_conf)
    # OOD positive with score -conf: the same thresholds, swept from the lowest confidence up
    ood_up, id_up = ood_counts[::-1], id_counts[::-1]
    return {
        "fpr95": _fpr_at_tpr(id_counts, ood_counts, TPR_LEVEL),
        "fpr95_ood_positive": _fpr_at_tpr(ood_up, id_up, TPR_LEVEL),
        "auroc": _auroc(id_counts, ood_counts),
        "aupr_in": _average_precision(id_counts, ood_counts),
        "aupr_out": _average_precision(ood_up, id_up),
    }


def roc_curve(id_scores, ood_scores, higher_is_id: bool,
              max_points: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points of the ROC, ID positive, from (0, 0) to (1, 1), for plotting.

    Long curves are thinned to about ``max_points`` points spread evenly over the thresholds;
    the ends are always kept.
    """
    id_conf = _as_scores(id_scores, "id_scores")
    ood_conf = _as_scores(ood_scores, "ood_scores")
    if not higher_is_id:
        id_conf, ood_conf = -id_conf, -ood_conf
    id_counts, ood_counts = _counts_per_threshold(id_conf, ood_conf)
    tpr = np.concatenate([[0.0], np.cumsum(id_counts) / id_counts.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(ood_counts) / ood_counts.sum()])
    if tpr.size > max_points:
        keep = np.unique(np.linspace(0, tpr.size - 1, max_points).round().astype(int))
        tpr, fpr = tpr[keep], fpr[keep]
    return fpr, tpr
