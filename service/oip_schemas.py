"""Bodies of the Open Inference Protocol (OIP, "KServe v2") REST API, as the protocol
defines them: server and model metadata, the inference request and response.

The request models check only the protocol's structure (names, types, shapes as lists of
integers); what oodserve accepts on top of that (one ``BYTES`` input of encoded images, its
outputs, its parameters) is checked by :mod:`service.routers.v2`, whose messages can then
name the tensor or element at fault.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A parameter value, as the protocol allows it: a JSON boolean, number or string.
ParameterValue = bool | int | float | str
Parameters = dict[str, ParameterValue]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1 for a dimension of any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool
    reason: str | None = Field(None, description="why not, as /readyz says it")


class ModelReady(BaseModel):
    name: str
    ready: bool
    reason: str | None = Field(None, description="why not, as /readyz says it")


class RequestInput(BaseModel):
    """One input tensor. ``data`` holds the elements in JSON (row-major, flat or nested);
    with the binary tensor data extension they follow the JSON instead, and
    ``parameters.binary_data_size`` says how many bytes they take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]
