"""OOD metrics cross-checked against scikit-learn (the test-only reference), ties included."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from training.metrics import ood_metrics


def sklearn_reference(id_s, ood_s, higher_is_id: bool) -> dict[str, float]:
    """The metrics as module docstring defines them, written with scikit-learn."""
    conf = np.r_[id_s, ood_s] * (1.0 if higher_is_id else -1.0)
    y_id = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(y_id, conf, drop_intermediate=False)
    ood_fpr, ood_tpr, _ = roc_curve(1 - y_id, -conf, drop_intermediate=False)
    return {
        "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")],
        "fpr95_ood_positive": ood_fpr[np.searchsorted(ood_tpr, 0.95, side="left")],
        "auroc": roc_auc_score(y_id, conf),
        "aupr_in": average_precision_score(y_id, conf),
        "aupr_out": average_precision_score(1 - y_id, -conf),
    }


def assert_matches_sklearn(id_s, ood_s, higher_is_id: bool) -> None:
    ours = ood_metrics(id_s, ood_s, higher_is_id)
    ref = sklearn_reference(id_s, ood_s, higher_is_id)
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("higher_is_id", [True, False])
def test_continuous_scores_match_sklearn(seed, higher_is_id):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(20, 500, size=2)
    id_s, ood_s = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.5, n_ood)
    sign = 1.0 if higher_is_id else -1.0  # same detector quality whichever way it points
    assert_matches_sklearn(sign * id_s, sign * ood_s, higher_is_id)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("higher_is_id", [True, False])
def test_integer_scores_with_many_ties_match_sklearn(seed, higher_is_id):
    # a handful of distinct values: ties within and across the sets, also at the 95% cut
    rng = np.random.default_rng(100 + seed)
    n_id, n_ood = rng.integers(5, 300, size=2)
    id_s, ood_s = rng.integers(0, 8, n_id), rng.integers(-3, 5, n_ood)
    sign = 1 if higher_is_id else -1
    assert_matches_sklearn(sign * id_s, sign * ood_s, higher_is_id)


@pytest.mark.parametrize("n_id,n_ood", [(1, 1), (1, 7), (20, 1), (19, 21)])
def test_small_and_unequal_sets_match_sklearn(n_id, n_ood):
    rng = np.random.default_rng(n_id * 1000 + n_ood)
    assert_matches_sklearn(rng.integers(0, 3, n_id), rng.integers(0, 3, n_ood), True)


def test_large_sets_match_sklearn():
    rng = np.random.default_rng(7)
    id_s = np.round(rng.normal(1.0, 1.0, 100_000), 2)  # rounding keeps ties in play
    assert_matches_sklearn(id_s, np.round(rng.normal(0.0, 1.0, 60_000), 2), True)


def test_hand_computed_example():
    # ID (higher = ID) scores 1..20. Keeping >= 95% of ID means accepting at least 19 of 20,
    # and the largest threshold that does so is t = 2 (accepts 2..20). OOD scores 0, 2, 2, 5:
    # three of them are >= 2, so fpr95 = 3/4.
    # OOD-positive reading: catching >= 95% of 4 OOD samples means catching all 4, so flag as
    # OOD every score <= 5; ID scores 1..5 are flagged, so fpr95_ood_positive = 5/20.
    # AUROC: of the 80 (id, ood) pairs, id > ood in 20 + 18 + 18 + 15 = 71 and the three ties
    # (2, 2), (2, 2), (5, 5) count half: (71 + 1.5) / 80 = 0.90625.
    m = ood_metrics(np.arange(1, 21), np.array([0, 2, 2, 5]), higher_is_id=True)
    assert m["fpr95"] == 0.75
    assert m["fpr95_ood_positive"] == 0.25
    assert m["auroc"] == 0.90625


def test_ties_at_the_threshold_move_together():
    # Two ID samples at 0 and eighteen at 5: t = 5 keeps only 90% of ID, so t = 0, and every
    # OOD sample tied at 0 is accepted with them: OOD {0, 0, 3, -1} -> fpr95 = 3/4.
    id_s = np.r_[np.zeros(2), np.full(18, 5.0)]
    assert ood_metrics(id_s, np.array([0.0, 0.0, 3.0, -1.0]), True)["fpr95"] == 0.75


def test_fpr95_keeps_every_threshold_unlike_sklearns_default_curve():
    # ROC points (tp, fp) at thresholds 10, 9, 8 are (18, 0), (19, 1), (20, 2): collinear, so
    # roc_curve's default drop_intermediate removes (19, 1), which is where TPR first reaches
    # 95%. The definition uses that threshold: fpr95 = 1/2, not 2/2.
    id_s, ood_s = np.r_[np.full(18, 10.0), 9.0, 8.0], np.array([9.0, 8.0])
    assert ood_metrics(id_s, ood_s, True)["fpr95"] == 0.5
    fpr, tpr, _ = roc_curve(np.r_[np.ones(20), np.zeros(2)], np.r_[id_s, ood_s])
    assert fpr[np.searchsorted(tpr, 0.95, side="left")] == 1.0


@pytest.mark.parametrize("higher_is_id", [True, False])
def test_perfectly_separated_sets(higher_is_id):
    id_s, ood_s = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0])
    if not higher_is_id:
        id_s, ood_s = -id_s, -ood_s
    m = ood_metrics(id_s, ood_s, higher_is_id)
    assert m == {"fpr95": 0.0, "fpr95_ood_positive": 0.0, "auroc": 1.0, "aupr_in": 1.0,
                 "aupr_out": 1.0}


def test_wrong_direction_is_the_worst_detector():
    m = ood_metrics(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0]), higher_is_id=False)
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0


def test_identical_distributions_are_chance():
    rng = np.random.default_rng(3)
    m = ood_metrics(rng.normal(size=20_000), rng.normal(size=20_000), higher_is_id=True)
    assert m["auroc"] == pytest.approx(0.5, abs=0.02)
    assert m["fpr95"] == pytest.approx(0.95, abs=0.02)
    same = ood_metrics(np.ones(10), np.ones(5), higher_is_id=True)
    assert same["auroc"] == 0.5 and same["fpr95"] == 1.0 and same["aupr_in"] == 10 / 15


def test_torch_tensors_accepted():
    id_s = torch.tensor([-10.0, -9.0], requires_grad=True)  # energies: lower = more ID
    m = ood_metrics(id_s * 1, torch.tensor([-1.0]), higher_is_id=False)
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    half = ood_metrics(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), torch.tensor([1]), True)
    assert half["auroc"] == 1.0


@pytest.mark.parametrize(
    "bad,message",
    [([], "non-empty 1-D"), ([[1.0, 2.0]], "non-empty 1-D"), (5.0, "non-empty 1-D"),
     ([1.0, float("nan")], "NaN or infinite"), ([float("-inf")], "NaN or infinite"),
     (["a", "b"], "numeric")],
)
@pytest.mark.parametrize("which", ["id_scores", "ood_scores"])
def test_invalid_input(bad, message, which):
    good = np.array([1.0, 2.0])
    args = (bad, good) if which == "id_scores" else (good, bad)
    with pytest.raises(ValueError, match=f"{which}.*{message}"):
        ood_metrics(*args, higher_is_id=True)


def test_roc_curve_matches_sklearn_and_is_thinned():
    from sklearn.metrics import roc_curve as sk_roc

    from training.metrics import roc_curve

    rng = np.random.default_rng(5)
    id_s, ood_s = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # many ties
    fpr, tpr = roc_curve(-id_s, -ood_s, higher_is_id=False)  # energy-like direction
    y = np.r_[np.ones(300), np.zeros(200)]
    sk_fpr, sk_tpr, _ = sk_roc(y, np.r_[id_s, ood_s], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    fpr, tpr = roc_curve(rng.normal(size=5000), rng.normal(size=5000), True, max_points=50)
    assert 40 <= fpr.size <= 50 and (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
