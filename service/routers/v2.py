"""The Open Inference Protocol (OIP, "KServe v2") REST API, beside the native one, so that
the clients of KServe, Triton and MLServer (``tritonclient``, KServe's) can talk to
oodserve: server and model metadata, health, and inference.

Images go in as one input tensor, ``images``, of datatype ``BYTES`` and shape ``[N]``: each
element one encoded image, decoded exactly as an upload to ``/predict`` is. The bytes follow
the JSON with the binary tensor data extension (what tritonclient sends), or, in plain JSON,
are base64 strings (MLServer's ``content_type: base64``), since JSON strings cannot carry raw
bytes. Each image is scored by :meth:`Engine.predict <service.engine.Engine.predict>` under
one :meth:`~service.engine.Engine.request_decoding`, as ``/predict/batch`` does, so the
batcher, the pixel budgets, overload, metrics and OOD counting are the same. The protocol
has no per-item errors: one image that cannot be scored fails the request, with a message
naming its index.

Per-request thresholds are request ``parameters`` validated by
:class:`~service.schemas.PredictParams`, as ``/predict``'s query parameters are; the
thresholds used, and where they came from, are in the response's ``parameters``. Errors are
the protocol's ``{"error": "<message>"}`` (:func:`service.errors.is_oip`).

These routes are left out of the service's OpenAPI document: the protocol's own
specification describes them, and an inference body (JSON followed by raw tensor bytes) is
not something OpenAPI can state.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

import service
from service.admission import Reservation
from service.decoding import RequestTooLarge
from service.engine import Engine
from service.errors import ServiceError
from service.oip_schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    Parameters,
    RequestInput,
    ResponseOutput,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)
from service.routers.deps import engine_for, readiness
from service.schemas import Prediction, PredictParams
from service.security import authorize
from service.shedding import head_reservation
from training.detectors import SERVED, SERVED_NAMES

router = APIRouter(prefix="/v2", include_in_schema=False)

INPUT = "images"
PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
# Content-Encoding of a request body -> zlib's wbits for it (tritonclient can compress).
ENCODINGS = {"gzip": 31, "deflate": 15}

# Output name -> (datatype, the value of one image). `probabilities` is a row per image, in
# class order: the predictions are made with every class in their top_k (_predict_all). Each
# served detector gives its score (`<name>`) and its decision (`<name>_is_ood`).
OUTPUTS: dict[str, tuple[str, Callable[[Prediction], Any]]] = {
    "label": ("BYTES", lambda p: p.label),
    "class_index": ("INT64", lambda p: p.class_index),
    "probabilities": ("FP32", lambda p: [c.probability for c in
                                         sorted(p.top_k, key=lambda c: c.index)]),
    **{d: ("FP32", attrgetter(f"{d}.score")) for d in SERVED_NAMES},
    **{f"{d}_is_ood": ("BOOL", attrgetter(f"{d}.is_ood")) for d in SERVED_NAMES},
    "is_ood": ("BOOL", lambda p: p.is_ood),
}
PER_CLASS = "probabilities"
NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "invalid_request", message)


# -- metadata and health ----------------------------------------------------------------

@router.get("")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="oodserve", version=service.__version__,
                          extensions=EXTENSIONS)


@router.get("/health/live")
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready")
async def server_ready(request: Request) -> JSONResponse:
    """The readiness of ``/readyz``, and its status codes (200, or 503 with the reason)."""
    reason = await readiness(request)
    return JSONResponse(ServerReady(ready=reason is None, reason=reason).model_dump(
        exclude_none=True), status_code=200 if reason is None else 503)


def _model_metadata(engine: Engine) -> ModelMetadata:
    classes = len(engine.manifest.classes)
    return ModelMetadata(
        name=engine.model_ref.name, versions=[engine.model_ref.version], platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=name, datatype=datatype,
                                shape=[-1, classes] if name == PER_CLASS else [-1])
                 for name, (datatype, _) in OUTPUTS.items()])


# Each model route also exists per version (``.../versions/{version}/...``): one function
# serves both paths and reads ``version`` from the path when it has one (declared as a
# parameter, FastAPI would read it from the query string on the path without it).

def _version(request: Request) -> str | None:
    return request.path_params.get("version")


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str) -> ModelMetadata:
    return _model_metadata(await engine_for(request, name, _version(request)))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str) -> JSONResponse:
    engine = await engine_for(request, name, _version(request))
    reason = await engine.not_ready_reason()
    body = ModelReady(name=engine.model_ref.name, ready=reason is None, reason=reason)
    return JSONResponse(body.model_dump(exclude_none=True),
                        status_code=200 if reason is None else 503)


# -- inference ----------------------------------------------------------------------------

@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, _version(request))


async def _infer(request: Request, name: str, version: str | None) -> Response:
    authorize(request)  # before the body is read, as on /predict
    engine = await engine_for(request, name, version)
    if request.url.query:
        raise _bad("the inference parameters go in the request's `parameters`, not in the "
                   "query string")
    body = await _body(request, engine.settings.max_upload_bytes)
    request_, binary = _split(body, request.headers.get(HEADER_LENGTH))
    images = _images(request_.inputs, binary, engine.settings.max_batch_images)
    params, binary_output = _parameters(request_.parameters)
    outputs = _outputs(request_.outputs, binary_output, len(engine.manifest.classes))
    predictions = await _predict_all(engine, images, params, head_reservation(request))
    return _response(engine, request_.id, predictions, outputs)


async def _body(request: Request, limit: int) -> bytes:
    """The body (its size limited by the middleware), decompressed if it is gzip or deflate
    data, with the same limit on what it decompresses to."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ENCODINGS:
        raise ServiceError(415, "unsupported_encoding", f"Content-Encoding {encoding[:40]!r} "
                           "is not supported; send identity, gzip or deflate")
    decompressor = zlib.decompressobj(ENCODINGS[encoding])
    try:
        plain = decompressor.decompress(body, limit + 1)
    except zlib.error:
        raise _bad(f"the body is not {encoding} data") from None
    if len(plain) > limit:
        raise ServiceError(413, "body_too_large", f"the body decompresses to more than "
                           f"{limit} bytes (OODSERVE_MAX_UPLOAD_BYTES)")
    if not decompressor.eof or decompressor.unused_data:
        raise _bad(f"the body is truncated or trailed by other bytes than {encoding} data")
    return plain


def _split(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON inference request and the binary tensor data after it (the extension:
    ``Inference-Header-Content-Length`` says where the JSON ends)."""
    if header_length is None:
        json, binary = body, b""
    else:
        # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
        if not (header_length.isascii() and header_length.isdigit()) or not (
                0 < int(header_length) <= len(body)):
            raise _bad(f"{HEADER_LENGTH} must be the length of the JSON at the start of the "
                       f"body: between 1 and {len(body)}")
        json, binary = body[:int(header_length)], body[int(header_length):]
    try:
        return InferenceRequest.model_validate_json(json), binary
    except ValidationError as exc:
        raise _bad("the inference request: " + _problems(exc)) from None


def _problems(exc: ValidationError, prefix: str = "") -> str:
    return "; ".join(f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                     if e["loc"] or prefix else e["msg"] for e in exc.errors())


def _images(inputs: list[RequestInput], binary: bytes, max_images: int) -> list[bytes]:
    """The encoded images of the ``images`` input, checked against its shape."""
    names = [tensor.name for tensor in inputs]
    unknown = [n for n in names if n != INPUT]
    if unknown:
        raise _bad(f"unknown input {unknown[0][:100]!r}; the model takes one input, "
                   f"{INPUT!r} (BYTES, shape [N]: encoded images)")
    if not names:
        raise _bad(f"missing input {INPUT!r} (BYTES, shape [N]: encoded images)")
    if len(names) > 1:
        raise _bad(f"input {INPUT!r} given {len(names)} times")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise _bad(f"input {INPUT!r} has datatype {tensor.datatype[:20]!r}; it must be "
                   "BYTES (encoded images)")
    if len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise _bad(f"input {INPUT!r} has shape {tensor.shape[:8]}; it must be [N], N the "
                   "number of images")
    count = tensor.shape[0]
    if count == 0:
        raise _bad(f"input {INPUT!r} has no images (shape [0])")
    if count > max_images:
        raise ServiceError(413, "too_many_images", f"at most {max_images} images per request "
                           "(OODSERVE_MAX_BATCH_IMAGES)")
    params = tensor.parameters or {}
    unknown = sorted(params.keys() - {"binary_data_size", "content_type"})
    if unknown:
        raise _bad(f"input {INPUT!r}: unknown parameter {unknown[0][:100]!r} (it takes "
                   "binary_data_size or content_type)")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise _bad(f"input {INPUT!r}: binary_data_size must be the number of bytes after "
                       f"the JSON, {len(binary)}")
        if tensor.data is not None or "content_type" in params:
            raise _bad(f"input {INPUT!r}: binary data and `data` or content_type together")
        images = _unpack_bytes(binary, count)
    else:
        if binary:
            raise _bad(f"{len(binary)} bytes follow the JSON but input {INPUT!r} has no "
                       "binary_data_size parameter")
        if tensor.data is None:
            raise _bad(f"input {INPUT!r} has neither `data` nor binary data")
        if params.get("content_type", "base64") != "base64":
            raise _bad(f"input {INPUT!r}: content_type must be base64: in JSON, each image is "
                       "a base64 string")
        images = [_base64(i, value) for i, value in enumerate(tensor.data[:count + 1])]
    if len(images) != count:
        raise _bad(f"input {INPUT!r} has shape [{count}] but "
                   f"{'more' if len(images) > count else len(images)} elements")
    return images


def _unpack_bytes(binary: bytes, count: int) -> list[bytes]:
    """The elements of a BYTES tensor in binary form: each a 4-byte little-endian length and
    that many bytes. Stops after ``count + 1``: more than the shape says is an error anyway."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(binary) and len(elements) <= count:
        if offset + 4 > len(binary):
            raise _bad(f"input {INPUT!r}: element {len(elements)} is cut off in its length")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise _bad(f"input {INPUT!r}: element {len(elements)} says {length} bytes, "
                       f"{len(binary) - offset} follow")
        elements.append(binary[offset:offset + length])
        offset += length
    return elements


def _base64(index: int, value: object) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"input {INPUT!r}: element {index} is not a string (in JSON, each image "
                   "is a base64 string)")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise _bad(f"input {INPUT!r}: element {index} is not valid base64") from None


def _parameters(given: Parameters | None) -> tuple[PredictParams, bool]:
    """The request's threshold parameters, validated by :class:`PredictParams` as /predict's
    are, and the extension's ``binary_data_output``."""
    given = dict(given or {})
    binary_output = given.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise _bad("parameters.binary_data_output must be true or false")
    if "top_k" in given:
        raise _bad("parameters.top_k: ask for the probabilities output with the "
                   "classification parameter instead (tritonclient: "
                   "InferRequestedOutput('probabilities', class_count=k))")
    if "model" in given:  # a /predict parameter; here the path names the model
        raise _bad("parameters.model: the model is the one the path names "
                   "(/v2/models/{name}/infer)")
    for key, value in given.items():
        if isinstance(value, bool):  # pydantic would take true for 1.0
            raise _bad(f"parameters.{key[:100]}: a boolean is not a valid value")
    try:
        return PredictParams.model_validate(given), binary_output
    except ValidationError as exc:
        raise _bad(_problems(exc, "parameters.")) from None


# (name, whether its data is binary, classification count or None)
Requested = tuple[str, bool, int | None]


def _outputs(requested: list | None, binary_default: bool, classes: int) -> list[Requested]:
    """The outputs to return, each binary or not, in the order asked (all when none is)."""
    if requested is None:
        return [(name, binary_default, None) for name in OUTPUTS]
    if not requested:
        raise _bad("outputs is empty; leave it out to get every output")
    chosen: list[Requested] = []
    for output in requested:
        if output.name not in OUTPUTS:
            raise _bad(f"unknown output {output.name[:100]!r}; the outputs are "
                       f"{', '.join(OUTPUTS)}")
        if output.name in (c[0] for c in chosen):
            raise _bad(f"output {output.name!r} asked for twice")
        params = output.parameters or {}
        unknown = sorted(params.keys() - {"binary_data", "classification"})
        if unknown:
            raise _bad(f"output {output.name!r}: unknown parameter {unknown[0][:100]!r} "
                       "(outputs take binary_data, and probabilities classification)")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _bad(f"output {output.name!r}: binary_data must be true or false")
        count = params.get("classification")
        if count is not None:
            if output.name != PER_CLASS:
                raise _bad(f"output {output.name!r}: classification applies to the "
                           f"{PER_CLASS} output only")
            if isinstance(count, bool):
                raise _bad(f"output {PER_CLASS!r}: classification must be a number of "
                           "classes")
            try:
                count = PredictParams.model_validate({"top_k": count}).top_k
            except ValidationError as exc:
                raise _bad(f"output {PER_CLASS!r}: classification: "
                           f"{exc.errors()[0]['msg']}") from None
            count = min(count, classes)
        chosen.append((output.name, binary, count))
    return chosen


async def _predict_all(engine: Engine, images: list[bytes], params: PredictParams,
                       head: Reservation | None) -> list[Prediction]:
    """Every image's prediction, all classes ranked; the first image that cannot be scored
    fails the request (the others are dropped, as on /predict/batch)."""
    policy = engine.policy_for(params)
    all_classes = len(engine.manifest.classes)
    # Admitted as a whole, or refused (413 over the pixel budget by the headers, 503) before
    # any image is decoded; one pixel budget and pool share for them all.
    decoding = engine.request_decoding(images, head)

    async def one(index: int, data: bytes) -> Prediction:
        try:
            return await engine.predict(data, policy, all_classes, decoding)
        except ServiceError as exc:
            if exc.status >= 500 or isinstance(exc, RequestTooLarge):
                raise  # the server's failure, or the request's as a whole
            raise ServiceError(exc.status, exc.code, f"input {INPUT!r}: element {index}: "
                               f"{exc.message}", exc.headers) from None

    return await decoding.gather([one(i, data) for i, data in enumerate(images)])


def _tensor(name: str, predictions: list[Prediction],
            classification: int | None) -> tuple[str, list[int], list]:
    """(datatype, shape, row-major elements) of one output."""
    if classification is not None:  # Triton's "value:index:label" strings, best first
        return "BYTES", [len(predictions), classification], [
            f"{c.probability}:{c.index}:{c.label}"
            for p in predictions for c in p.top_k[:classification]]
    datatype, value = OUTPUTS[name]
    values = [value(p) for p in predictions]
    if name == PER_CLASS:
        return datatype, [len(values), len(values[0])], [x for row in values for x in row]
    return datatype, [len(values)], values


def _encode(datatype: str, values: list) -> bytes:
    """The binary form of a tensor's elements (the binary tensor data extension)."""
    if datatype == "BYTES":
        encoded = [v.encode("utf-8") for v in values]
        return b"".join(struct.pack("<I", len(v)) + v for v in encoded)
    return np.asarray(values, dtype=NUMPY_TYPES[datatype]).tobytes()


def _thresholds(p: Prediction) -> Parameters:
    """What decided "out of distribution", the same for every image of a request."""
    out: Parameters = {"decision": p.decision}
    out |= {f"{d.name}_block": getattr(p, d.name).block for d in SERVED if d.block}
    for detector in SERVED_NAMES:
        result = getattr(p, detector)
        out[f"{detector}_threshold"] = result.threshold
        out[f"{detector}_threshold_source"] = result.threshold_source
        if result.tpr is not None:
            out[f"{detector}_tpr"] = result.tpr
    return out


def _response(engine: Engine, request_id: str | None, predictions: list[Prediction],
              outputs: list[Requested]) -> Response:
    tensors: list[ResponseOutput] = []
    blobs: list[bytes] = []
    for name, binary, classification in outputs:
        datatype, shape, values = _tensor(name, predictions, classification)
        if binary:
            blob = _encode(datatype, values)
            blobs.append(blob)
            tensors.append(ResponseOutput(name=name, datatype=datatype, shape=shape,
                                          parameters={"binary_data_size": len(blob)}))
        else:
            tensors.append(ResponseOutput(name=name, datatype=datatype, shape=shape,
                                          data=values))
    response = InferenceResponse(model_name=engine.model_ref.name,
                                 model_version=engine.model_ref.version, id=request_id,
                                 parameters=_thresholds(predictions[0]), outputs=tensors)
    json = response.model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(json, media_type="application/json")
    return Response(json + b"".join(blobs), media_type=BINARY_MEDIA_TYPE,
                    headers={HEADER_LENGTH: str(len(json))})
