"""OOD score functions, defined once for training, evaluation and the service.

Sign conventions (kept everywhere in oodserve, in the API and in the metrics):

* ``energy(x) = -T * logsumexp(f(x) / T)``: the free energy of Liu et al. 2020 with T = 1 by
  default. **Lower = more in-distribution.** This is the quantity GReg's margins and
  gradient penalty are written in, so the service reports it as is (pytorch-ood's sign, the
  opposite of OpenOOD's ``conf``).
* ``featurenorm(x)``: mean over channels of the spatial L2 norm of the ReLU-rectified block
  output (Yu et al. 2023). **Higher = more in-distribution.**
* ``msp`` (max softmax probability) and ``max_logit``: **higher = more in-distribution.**

Each score's direction is recorded with it in the table of :mod:`training.detectors`, which
metrics and thresholds read instead of special cases.
"""

from __future__ import annotations

import torch


def _full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (autocast) are scored in float32; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy per sample, (N, C) -> (N,). Lower = more in-distribution."""
    return -temperature * torch.logsumexp(_full(logits) / temperature, dim=1)


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability per sample. Higher = more in-distribution."""
    return torch.softmax(_full(logits), dim=1).amax(dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Largest logit per sample. Higher = more in-distribution."""
    return _full(logits).amax(dim=1)


def featurenorm(feature_map: torch.Tensor) -> torch.Tensor:
    """FeatureNorm of a block output, (N, C, H, W) -> (N,). Higher = more in-distribution.

    ReLU first (a no-op on post-activation taps, essential on pre-activation ones such as
    WRN blocks), then the L2 norm of each channel over its spatial positions, then the mean
    over channels.
    """
    rectified = torch.relu(_full(feature_map))
    return torch.linalg.vector_norm(rectified.flatten(2), dim=2).mean(dim=1)
