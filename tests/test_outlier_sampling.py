"""GReg+ sampling: per-cluster extremes checked against brute force, k-means sanity."""

import pytest
import torch

from training.models import build_model
from training.outlier_sampling import EnergyClusterSampler, kmeans, pick_per_cluster
from training.scores import energy


def brute_force_extremes(energies, assign, per_cluster, two_way):
    chosen = set()
    for c in assign.unique().tolist():
        members = sorted((assign == c).nonzero().squeeze(1).tolist(), key=lambda i: energies[i])
        chosen.update(members[:per_cluster])
        if two_way:
            chosen.update(members[-per_cluster:])
    return chosen


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_cluster,two_way", [(1, True), (1, False), (3, True)])
def test_picks_are_the_min_and_max_energy_members_of_each_cluster(seed, per_cluster, two_way):
    g = torch.Generator().manual_seed(seed)
    energies = torch.randn(200, generator=g)  # distinct with probability 1
    assign = torch.randint(0, 17, (200,), generator=g)
    picked = pick_per_cluster(energies, assign, per_cluster, two_way)
    assert len(set(picked.tolist())) == picked.numel()  # no duplicates
    assert set(picked.tolist()) == brute_force_extremes(energies, assign, per_cluster, two_way)


def test_singleton_cluster_is_picked_once():
    energies = torch.tensor([0.5, 1.0, 2.0, 3.0])
    assign = torch.tensor([0, 1, 1, 1])
    assert sorted(pick_per_cluster(energies, assign, 1, True).tolist()) == [0, 1, 3]


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1) * 10
    points = torch.cat([c + 0.01 * torch.randn(25, 8, generator=g) for c in centres])
    assign = kmeans(points, 4, iters=20, generator=g)
    truth = torch.arange(4).repeat_interleave(25)
    # same partition up to relabelling: each true group maps to exactly one cluster id
    assert all(assign[truth == t].unique().numel() == 1 for t in range(4))
    assert assign.unique().numel() == 4


def test_sampler_returns_requested_count_including_the_cluster_extremes():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    pool = torch.randn(96, 3, 32, 32)
    sampler = EnergyClusterSampler(num_outliers=32, num_clusters=8, two_way=True, kmeans_iters=5)
    chosen = sampler.select(model, pool, torch.Generator().manual_seed(3))
    assert chosen.numel() == 32 and chosen.unique().numel() == 32
    # Recompute what the sampler saw and check its picks contain every cluster's extremes.
    with torch.no_grad():
        feats = model.forward_features(pool)
    z = torch.nn.functional.normalize(feats.penultimate, dim=1)
    assign = kmeans(z, 8, 5, torch.Generator().manual_seed(3))
    expected = brute_force_extremes(energy(feats.logits), assign, sampler.per_cluster, True)
    assert expected <= set(chosen.tolist())
    assert model.training is False  # the caller's mode is preserved


def test_sampler_rejects_more_picks_than_outliers():
    with pytest.raises(ValueError, match="clusters"):
        EnergyClusterSampler(num_outliers=10, num_clusters=8, two_way=True)
