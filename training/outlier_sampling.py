"""GReg+'s energy-based sampling of informative outliers (Algorithm 1 of the paper).

Each step, a pool of auxiliary candidates is scored by the current model (eval mode, no
grad); their pooled penultimate features are L2-normalised and clustered with k-means; from
each cluster the lowest-energy candidate (most ID-like, the most useful for the energy hinge)
and the highest-energy one (confidently OOD, the ones the gradient penalty applies to) are
taken, and the rest of the outlier batch is filled at random from the unpicked candidates.
Clustering makes the picks diverse: without it the lowest-energy candidates would crowd into
one region of feature space.

Everything runs in torch on the training device (k-means included), with an explicit
generator, so sampling costs one no-grad forward pass of the pool plus a few small matrix
products, never a round trip to the CPU, and is reproducible for exact resume.
"""

from __future__ import annotations

import torch

from training.models.base import TappedClassifier
from training.scores import energy


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster the rows of ``x`` (unit vectors) into ``k`` groups; returns (N,) assignments.

    k-means++ seeding (without host synchronisation), then Lloyd iterations with squared
    Euclidean distance (on unit vectors that is 2 - 2 cos, so this is spherical-friendly
    without special cases). A cluster that loses all its members keeps its old centre; the
    picking step simply finds it empty.
    """
    n = x.shape[0]
    k = min(k, n)
    first = torch.randint(n, (1,), generator=generator, device=generator.device)
    centres = x.index_select(0, first.to(x.device))
    closest = (x - centres).pow(2).sum(1)
    for _ in range(1, k):
        # The tiny floor keeps the draw defined when every point already coincides with a
        # centre (duplicate candidates); it is negligible otherwise.
        pick = torch.multinomial(closest.clamp_min(0) + 1e-12, 1, generator=generator)
        centre = x.index_select(0, pick)
        centres = torch.cat([centres, centre])
        closest = torch.minimum(closest, (x - centre).pow(2).sum(1))
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        new_assign = torch.cdist(x, centres).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def pick_per_cluster(
    energies: torch.Tensor, assign: torch.Tensor, per_cluster: int, two_way: bool
) -> torch.Tensor:
    """Indices of the ``per_cluster`` lowest-energy members of every cluster (and, with
    ``two_way``, also the ``per_cluster`` highest), without duplicates. Vectorised: sort by
    energy, then stably by cluster, and read each member's rank inside its cluster."""
    by_energy = torch.argsort(energies, stable=True)
    order = by_energy[torch.argsort(assign[by_energy], stable=True)]
    clusters = assign[order]
    sizes = torch.bincount(clusters)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel(), device=order.device) - starts[clusters]
    keep = rank < per_cluster
    if two_way:
        keep |= rank >= sizes[clusters] - per_cluster
    return order[keep]


class EnergyClusterSampler:
    """Choose ``num_outliers`` of a candidate pool for one GReg+ step.

    ``num_clusters`` defaults to the ID batch size (the paper and its code), and with
    ``two_way`` two picks per cluster give the code's B ID + 2B outliers per step.
    """

    def __init__(self, num_outliers: int, num_clusters: int, two_way: bool = True,
                 kmeans_iters: int = 10):
        if num_clusters < 1 or num_outliers < 1:
            raise ValueError("num_outliers and num_clusters must be positive")
        self.num_outliers, self.num_clusters = num_outliers, num_clusters
        self.two_way, self.kmeans_iters = two_way, kmeans_iters
        picks_per_cluster = 2 if two_way else 1
        if num_clusters * picks_per_cluster > num_outliers:
            raise ValueError(f"{num_clusters} clusters x {picks_per_cluster} picks exceed the "
                             f"{num_outliers} outliers per step; use fewer clusters")
        self.per_cluster = num_outliers // (num_clusters * picks_per_cluster)

    @torch.no_grad()
    def select(self, model: TappedClassifier, pool: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """Indices into ``pool`` of the chosen outliers (``num_outliers`` of them)."""
        if pool.shape[0] < self.num_outliers:
            raise ValueError(f"candidate pool of {pool.shape[0]} is smaller than the "
                             f"{self.num_outliers} outliers to pick")
        was_training = model.training
        model.eval()
        try:
            feats = model.forward_features(pool)
        finally:
            model.train(was_training)
        scores = energy(feats.logits)
        z = torch.nn.functional.normalize(feats.penultimate.float(), dim=1)
        assign = kmeans(z, self.num_clusters, self.kmeans_iters, generator)
        chosen = pick_per_cluster(scores, assign, self.per_cluster, self.two_way)
        missing = self.num_outliers - chosen.numel()
        if missing > 0:
            rest = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
            rest[chosen] = False
            spare = rest.nonzero().squeeze(1)
            fill = spare[torch.randperm(spare.numel(), generator=generator,
                                        device=generator.device)[:missing].to(spare.device)]
            chosen = torch.cat([chosen, fill])
        return chosen
