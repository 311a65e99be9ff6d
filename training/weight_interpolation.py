"""Weight-space interpolation between a run's starting weights and its fine-tuned weights,
and uniform averages of several weight sets of one network ("model soups").

Why: GReg+ fine-tuning buys OOD separation with ID accuracy, and the learning rate, the
knob a recipe usually turns for that trade, is a coarse one that costs a training run per
setting: too gentle and the OOD sets are not separated, too strong and accuracy falls
(README, "The default model"). Interpolating the two weight sets,
``(1 - alpha) * start + alpha * fine_tuned`` (WiSE-FT: Wortsman et al., "Robust fine-tuning
of zero-shot models", CVPR 2022), turns that trade into one continuous knob that is set after
training, costs nothing at serving time (the bundle holds one set of weights) and needs no
retraining to move. Both ends come from one fine-tuning run of one network, so the straight
line between them stays in a good region of the loss: on the ResNet-56 candidate, alpha 0.7
between the cross-entropy stage (89.97%) and a GReg+ run (89.43%) scored 90.05%, above both.

Averaging (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022) is the same idea with more
than two ends: fine-tuning runs of one network from nearby starting points land in one basin
of the loss, where their mean is usually more accurate than each run, again at no serving
cost. The README's model-soup experiment ("The default model") uses both: its starting point
is the mean of two cross-entropy cycles, its fine-tuned end the mean of three GReg+ runs.

BatchNorm running statistics are mixed like the parameters, as WiSE-FT and the soups do;
integer buffers (BatchNorm's step counters) are taken from the last weight set.
"""

from __future__ import annotations

import torch


def interpolate_states(start: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * fine_tuned`` for every floating-point tensor.

    ``alpha`` = 1 gives ``fine_tuned`` itself and 0 gives ``start`` (bit for bit; the sum is
    taken in float64). Raises ``ValueError`` when the two states do not have the same keys
    and shapes, or when ``alpha`` is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _weighted_sum([start, fine_tuned], [1.0 - alpha, alpha])


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of ``states`` (at least one), taken in float64 like
    :func:`interpolate_states`; of two sets it is ``interpolate_states(a, b, 0.5)`` bit for
    bit. Raises ``ValueError`` when the sets do not all have the same keys and shapes."""
    if not states:
        raise ValueError("nothing to average: give at least one weight set")
    return _weighted_sum(states, [1.0 / len(states)] * len(states))


def _weighted_sum(states: list[dict[str, torch.Tensor]],
                  weights: list[float]) -> dict[str, torch.Tensor]:
    last = states[-1]
    for i, other in enumerate(states[:-1]):
        if set(other) != set(last):
            diff = sorted(set(other) ^ set(last))
            raise ValueError(f"weight sets {i + 1} and {len(states)} have different tensors "
                             f"(e.g. {diff[:3]})")
        for key, value in last.items():
            if other[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(other[key].shape)} in weight set "
                                 f"{i + 1} vs {tuple(value.shape)} in {len(states)}")
    out = {}
    for key, value in last.items():
        if value.is_floating_point():
            mixed = sum(w * s[key].double() for w, s in zip(weights, states))
            out[key] = mixed.to(value.dtype)
        else:
            out[key] = value.clone()
    return out
