"""Request parameters and response bodies of the HTTP API (they make the OpenAPI schema).

Scores keep training's sign conventions: energy ``-logsumexp(logits)``, lower = more
in-distribution; FeatureNorm, higher = more in-distribution. A score equal to its threshold
is in-distribution.

The served detectors (:data:`training.detectors.SERVED`) are spelled out field by field
(``<name>_threshold`` in :class:`PredictParams`, ``<name>`` in :class:`Prediction`), so that
the API is written down here rather than generated from the table; the code around these
models loops over the table, and a test checks that every served detector has its fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.detectors import SERVED_NAMES, DecisionRule

ThresholdSource = Literal["bundle", "request", "tpr"]


class PredictParams(BaseModel):
    """Query parameters of the predict routes; all optional, the bundle fills the rest.

    A threshold given directly wins over ``tpr`` for its detector.
    """

    model_config = ConfigDict(extra="forbid")

    energy_threshold: float | None = Field(
        None, ge=-1e6, le=1e6, allow_inf_nan=False,
        description="OOD when energy > this (lower energy = more in-distribution)")
    featurenorm_threshold: float | None = Field(
        None, ge=0.0, le=1e6, allow_inf_nan=False,
        description="OOD when FeatureNorm < this (higher = more in-distribution)")
    tpr: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="target share of in-distribution images kept (e.g. 0.9); both "
                    "thresholds are read from the bundle's ID quantile tables")
    decision: DecisionRule | None = Field(
        None, description="how the detectors combine; default: the bundle's rule")
    top_k: int | None = Field(
        None, ge=1, le=1000, description="classes listed in top_k (capped at the number "
                                         "of classes); default: OODSERVE_TOP_K")
    model: str | None = Field(
        None, min_length=1, max_length=200,
        description="the served model to ask, by name (404 for one not served); default: "
                    "the default model (OODSERVE_DEFAULT_MODEL)")

    def thresholds(self) -> dict[str, float]:
        """The thresholds given directly, by detector name."""
        given = {name: getattr(self, f"{name}_threshold") for name in SERVED_NAMES}
        return {name: value for name, value in given.items() if value is not None}


class ErrorBody(BaseModel):
    code: str = Field(..., description="stable machine-readable reason",
                      examples=["image_too_large"])
    message: str = Field(..., description="what is wrong, for a person")
    id: str | None = Field(None, description="500 only: the id under which the failure is "
                                             "logged, to quote when reporting it")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx response."""

    error: ErrorBody


class ClassProbability(BaseModel):
    index: int
    label: str
    probability: float


class DetectorResult(BaseModel):
    score: float
    threshold: float
    threshold_source: ThresholdSource = Field(
        ..., description="bundle: calibrated default; request: energy_threshold or "
                         "featurenorm_threshold; tpr: read from the ID quantile table")
    tpr: float | None = Field(
        None, description="ID true-positive rate the threshold keeps (null for a "
                          "threshold given directly)")
    higher_is_id: bool = Field(..., description="direction of the score")
    is_ood: bool


class FeatureNormResult(DetectorResult):
    block: str = Field(..., description="the block whose features are measured")


class Prediction(BaseModel):
    class_index: int
    label: str
    probability: float = Field(..., description="softmax probability of the predicted class")
    top_k: list[ClassProbability]
    energy: DetectorResult
    featurenorm: FeatureNormResult
    is_ood: bool = Field(..., description="the combined decision under `decision`")
    decision: DecisionRule = Field(
        ..., description="any: OOD if either detector says so; all: if both do; energy or "
                         "featurenorm: that detector alone")


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(Prediction):
    model: ModelRef
    server_time_ms: float = Field(..., description="time spent in the server")


class BatchItem(BaseModel):
    """One image of a batch: a prediction or, if that image was rejected, an error."""

    index: int = Field(..., description="position of the image in the request")
    filename: str | None
    prediction: Prediction | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[BatchItem]
    server_time_ms: float


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None


class CalibrationSummary(BaseModel):
    threshold: float
    tpr: float
    higher_is_id: bool
    calibration_images: int


class ModelSummary(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    created: str
    architecture: str
    classes: list[str]
    input_size: int
    blocks: list[str] = Field(..., description="tapped blocks with their NormRatio")
    norm_ratios: dict[str, float]
    selected_block: str
    default_decision: DecisionRule
    thresholds: dict[str, CalibrationSummary]
    evaluation: dict = Field(..., description="evaluation results recorded in the bundle")
    weights_sha256: str
    device: str
    dtype: str
    max_batch_size: int
    max_batch_delay_ms: float


class ModelReload(BaseModel):
    """What a reload did to one model."""

    name: str | None = Field(..., description="null: a directory whose manifest cannot "
                                              "be read, so its model is not known")
    result: Literal["loaded", "unchanged", "refused", "removed"] = Field(
        ..., description="loaded: the new or changed bundle serves now; refused: it failed "
                         "its checks (or would remove the default model) and what served "
                         "before still does; removed: gone from the repository")
    version: str | None = Field(..., description="the version serving now (null: removed)")
    previous_version: str | None = Field(None, description="the version served before")
    message: str | None = Field(None, description="why it was refused")


class ReloadReport(BaseModel):
    ok: bool = Field(..., description="false when any change was refused")
    default_model: str
    models: list[ModelReload]
    other_workers: Literal["none", "signalled", "not_signalled"] = Field(
        ..., description="none: this process is the only one; signalled: the supervisor "
                         "was asked (SIGHUP) to reload the other workers, which they do "
                         "after this answer; not_signalled: it could not be reached")
