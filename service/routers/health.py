"""Liveness, readiness and the description of the served model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.errors import ERROR_RESPONSES
from service.routers.deps import engine_for, readiness
from service.schemas import CalibrationSummary, Health, ModelSummary, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness,
                             "description": "not ready yet, or the bundle on disk changed"}},
            summary="The bundle is loaded, the model warmed up, and the bundle on disk is "
                    "still the one being served")
async def readyz(request: Request) -> JSONResponse:
    reason = await readiness(request)
    state = Readiness(ready=reason is None, reason=reason)
    return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)


@router.get("/v1/model", response_model=ModelSummary, summary="What is being served",
            responses={status: ERROR_RESPONSES[status] for status in (404, 422, 503)})
async def model(request: Request, model: Annotated[str | None, Query(
        max_length=200, description="a served model's name; default: the default model")] = None
                ) -> ModelSummary:
    engine = await engine_for(request, model)
    m = engine.manifest
    return ModelSummary(
        name=m.name, version=m.version, created=m.created, architecture=m.architecture.name,
        classes=m.classes, input_size=m.preprocessing.input_size, blocks=m.taps,
        norm_ratios=m.featurenorm.norm_ratios, selected_block=m.featurenorm.selected_block,
        default_decision=m.default_decision,
        thresholds={name: CalibrationSummary(threshold=cal.threshold, tpr=cal.tpr,
                                             higher_is_id=cal.higher_is_id,
                                             calibration_images=cal.quantiles.count)
                    for name, cal in m.calibration.items()},
        evaluation=m.evaluation, weights_sha256=m.weights.sha256,
        device=engine.scorer.device, dtype=engine.scorer.dtype_name,
        max_batch_size=engine.scorer.max_batch_size,
        max_batch_delay_ms=engine.settings.max_batch_delay_ms)
