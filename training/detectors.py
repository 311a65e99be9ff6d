"""The detectors oodserve measures and serves, in one table that everything else loops over.

A :class:`Detector` names a score function of :mod:`training.scores`, the score's direction,
what it reads (the logits, or the output of one tapped block) and whether the service serves
it. :func:`training.evaluation.score_batch` computes every detector of :data:`DETECTORS`;
the report's tables and figures, the bundle's required calibration, the pipeline's
calibration, and the service's thresholds, decision rules, metrics and responses read
:data:`DETECTORS` or :data:`SERVED` rather than lists of their own, so a new detector is an
entry here (docs/training.md, "Adding a detector", says what else a served one needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from training import scores

# Which tapped block a detector on a block reads: the one NormRatio selected (the bundle
# taps it, so the service can serve such a detector), or the network's last block, the
# naive choice that reports compare the selection against.
BlockRole = Literal["selected", "last"]


@dataclass(frozen=True)
class Detector:
    """One OOD score. ``score`` maps the logits (N, C), or with ``block`` set the block's
    output (N, C, H, W), to one score per image (N,)."""

    name: str  # key in reports, manifests, metric labels and the API's fields
    score: Callable[[torch.Tensor], torch.Tensor]
    higher_is_id: bool
    title: str  # the name as people read it (capitalised): headings, axis labels, help
    block: BlockRole | None = None
    served: bool = False

    def __post_init__(self) -> None:
        if self.served and self.block not in (None, "selected"):
            raise ValueError(f"detector {self.name!r}: a bundle taps only the selected block, "
                             "so a served detector cannot read another one")

    @property
    def direction(self) -> str:
        return f"{'higher' if self.higher_is_id else 'lower'} = more in-distribution"

    def block_name(self, selected: str | None, last: str | None = None) -> str | None:
        """The block this detector reads, given the selected and the last block; None for a
        detector on the logits."""
        if self.block is None:
            return None
        name = selected if self.block == "selected" else last
        if name is None:
            raise ValueError(f"detector {self.name!r} reads the {self.block} block, "
                             "which was not given")
        return name


DETECTORS = (
    Detector("msp", scores.msp, higher_is_id=True, title="Max softmax probability"),
    Detector("max_logit", scores.max_logit, higher_is_id=True, title="MaxLogit"),
    Detector("energy", scores.energy, higher_is_id=False, title="Energy", served=True),
    Detector("featurenorm", scores.featurenorm, higher_is_id=True, title="FeatureNorm",
             block="selected", served=True),
    Detector("featurenorm_last", scores.featurenorm, higher_is_id=True, title="FeatureNorm",
             block="last"),
)
BY_NAME = {d.name: d for d in DETECTORS}
SERVED = tuple(d for d in DETECTORS if d.served)
SERVED_NAMES = tuple(d.name for d in SERVED)
# What training itself reads by name: energy is the quantity GReg trains and model choices
# are judged on; FeatureNorm at every block is what NormRatio and the block profile compare.
ENERGY, FEATURENORM = BY_NAME["energy"], BY_NAME["featurenorm"]

# How the served detectors' decisions combine: any, all, or one detector alone.
DecisionRule = Literal[("any", "all", *SERVED_NAMES)]
