"""Service settings, from ``OODSERVE_*`` environment variables and an optional ``.env`` file.

Every knob an operator may need is here and nowhere else, so that ``python -m service``
needs no arguments and a container is configured by its environment alone. The ``.env`` file
is read from the working directory; real environment variables win over it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The default model: a directory of models/ (the one place that names it).
DEFAULT_BUNDLE_NAME = "cifar10-resnet56-gregplus"
# Resolved from the package, not the working directory, so that `python -m service` serves
# the default model wherever it is started from: from models/ of the source checkout (an
# editable install included), or from the copy of models/ that an installed wheel carries
# inside this package (service/_models, put there by setup.py).
REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALLED_MODELS = Path(__file__).resolve().parent / "_models"
MODELS_DIR = INSTALLED_MODELS if INSTALLED_MODELS.is_dir() else REPO_ROOT / "models"
DEFAULT_BUNDLE = MODELS_DIR / DEFAULT_BUNDLE_NAME


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPU cores this process may use: the cores it may run on (affinity and cpuset aware,
    unlike os.cpu_count), capped by a cgroup v2 CPU quota rounded up (a container started
    with ``--cpus 2`` on a 32-core host gets 2, not 32)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here
        pass
    return cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OODSERVE_", env_file=".env",
                                      env_file_encoding="utf-8", extra="ignore")

    bundle: Path = Field(DEFAULT_BUNDLE, description="model bundle directory")
    model_repository: Path | None = Field(
        None, description="directory of bundles served at once: each subdirectory holding a "
                          "manifest.json, addressed by the manifest's name (the highest "
                          "version of a name; versions are dotted integers); unset: "
                          "OODSERVE_BUNDLE alone. Not in the engine layout")
    default_model: str | None = Field(
        None, description="the model of requests that name none (no ?model=); default: "
                          "OODSERVE_BUNDLE's model if the repository serves its name, else "
                          "the repository's only model")
    bundle_public_key: Path | None = Field(
        None, description="Ed25519 public key (PEM file) the bundle must be signed with "
                          "(manifest.json.sig, python -m training sign): an unsigned or "
                          "wrongly signed bundle stops the start; unset: not checked")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU")
    precision: Literal["float32", "tf32", "float16", "bfloat16"] = Field(
        "float32", description="arithmetic on CUDA (the CPU serves float32): float32 gives "
                               "training's evaluation scores; the others are faster and move "
                               "the default thresholds' accept rates by at most 0.5 points "
                               "(tests/test_gpu.py, docs/benchmarks.md)")
    cuda_graphs: bool = Field(
        True, description="capture the forward pass as CUDA graphs during warm-up, one per "
                          "padded batch size (service/inference.py)")
    cpu_trace: bool = Field(
        True, description="on the CPU, trace the forward pass to TorchScript during warm-up, "
                          "so that it runs without the GIL (service/inference.py)")
    layout: Literal["auto", "replicated", "engine"] = Field(
        "auto", description="replicated: each worker process has its own model and "
                            "batcher; engine: the workers do HTTP and decoding and hand "
                            "images through shared memory to one process that owns the "
                            "model and batches across them (service/engine_server.py); "
                            "auto: engine on a GPU, replicated on the CPU")
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0: every "
                                               "IPv4 interface (in a container, say)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="HTTP worker processes; auto: one per core (replicated layout), "
                            "one per core but one (engine layout: that one runs the model)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU per worker; default: the "
                                "available cores shared out between the workers")
    decode_workers: int | None = Field(
        None, ge=1, le=64, description="image decoding threads per worker; default: "
                                       "min(4, that share)")
    tune_malloc: bool = Field(
        True, description="glibc malloc thresholds that keep batched forward passes on the "
                          "CPU from returning memory to the kernel after every operator "
                          "(service/allocator.py)")
    max_batch_size: int | None = Field(
        None, ge=1, le=1024, description="images per forward pass; default: 32 on the CPU, "
                                         "1024 on CUDA")
    max_batch_delay_ms: float = Field(
        2.0, ge=0.0, le=1000.0,
        description="longest time the oldest queued image waits for admitted images still "
                    "on their way (waiting for decoding or being decoded) to join its batch")
    max_queue_size: int = Field(
        1024, ge=1, description="queued images beyond which a request gets 503, as a whole")
    max_queue_wait_ms: float = Field(
        1000.0, gt=0.0, le=600_000.0,
        description="longest expected wait in the queue (queued images over the measured "
                    "images per second) beyond which requests get 503, before decoding")
    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="request body limit, checked while streaming")
    max_image_pixels: int = Field(
        25_000_000, ge=64, description="width x height limit of one image before decoding")
    max_request_pixels: int = Field(
        32_000_000, ge=64, description="decoded pixels of all a request's images together "
                                       "(a large JPEG counts at the reduced scale it is "
                                       "decoded at); beyond it the request gets 413")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024,
        description="request line and headers together; beyond: 431")
    max_headers: int = Field(100, ge=8, le=10_000, description="header fields per request; "
                                                                "beyond: 431")
    read_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="longest wait for a request's headers to "
                                             "complete, and for each next part of its body; "
                                             "beyond: 408 and the connection is closed")
    max_requests_per_connection: int = Field(
        1000, ge=0, description="requests on one keep-alive connection; the last is answered "
                                "with Connection: close, so that clients reconnect and spread "
                                "over the workers again (after a worker is replaced, say); "
                                "0: no limit")
    max_drain_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="body bytes read and dropped after an early "
                                            "refusal (401, 413, ...) so that clients that "
                                            "send the whole body first read the answer; a "
                                            "larger rest: the connection is closed instead")
    max_batch_images: int = Field(64, ge=1, le=1024, description="images per batch request")
    top_k: int = Field(5, ge=1, description="default number of classes in top_k")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="level of the service's and uvicorn's log lines")
    access_log: bool = Field(
        False, description="uvicorn's per-request log lines (they show paths and query "
                           "strings, so they are off by default)")
    api_key: SecretStr | None = Field(
        None, description="bearer token the predict endpoints require (Authorization: "
                          "Bearer <key>); unset or empty: they are open")

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or raw == "":
            return None  # OODSERVE_API_KEY= (e.g. passed through empty) means no key
        if not isinstance(raw, str) or len(raw) < 16 or not all(
                "!" <= c <= "~" for c in raw):
            # Not echoed: the message would put the key in the start-up log.
            raise ValueError("must be at least 16 printable ASCII characters without spaces")
        return raw

    @field_validator("bundle_public_key", mode="before")
    @classmethod
    def _no_key_when_empty(cls, value: object) -> object:
        return None if value == "" else value  # passed through empty: no key

    @field_validator("bundle_public_key")
    @classmethod
    def _usable_key(cls, value: Path | None) -> Path | None:
        if value is not None:
            from training.signing import load_public_key

            load_public_key(value)  # a key that cannot be read stops the start here
        return value

    @field_validator("model_repository", "default_model", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if value == "" else value  # passed through empty (compose): unset

    @model_validator(mode="after")
    def _a_batch_fits_the_queue(self) -> Settings:
        # A request is admitted whole or not at all (service/admission.py): one with more
        # images than the queue holds would be told to retry forever.
        if self.max_batch_images > self.max_queue_size:
            raise ValueError(f"max_batch_images ({self.max_batch_images}) is more than "
                             f"max_queue_size ({self.max_queue_size}): a full batch request "
                             "could never be admitted")
        return self

    def resolved_layout(self, cuda: bool) -> Literal["replicated", "engine"]:
        """``layout``, with ``auto`` decided. On a GPU one Python process cannot keep up
        with the device (HTTP, decoding and responses cost far more CPU per request than
        the GPU needs per image), and a model copy per process costs a CUDA context each
        and splits the batches, so the workers share one engine. On the CPU the forward
        pass itself needs the cores, and the replicated layout measured faster
        (docs/benchmarks.md)."""
        if self.layout != "auto":
            return self.layout
        return "engine" if cuda else "replicated"

    def resolved_workers(self, cuda: bool) -> int:
        """``workers``, with ``auto`` decided: one process per core, because one process is
        held back by its GIL (HTTP, decoding, and in the replicated layout the dispatch of
        each operator of the forward pass, take turns on it) long before the cores are
        busy; in the engine layout one core is left to the engine."""
        if self.workers != "auto":
            return self.workers
        cores = available_cores()
        return max(1, cores - 1) if self.resolved_layout(cuda) == "engine" else cores

    def resolved_max_batch_size(self, cuda: bool) -> int:
        """On CUDA the model alone scores more images a second the larger the batch, up to
        1024 and beyond (docs/benchmarks.md), and a batch is only as large as the load makes
        it; on the CPU, batches past 32 only add waiting."""
        return self.max_batch_size or (1024 if cuda else 32)

    def _cores_per_worker(self) -> int:
        # A process made by create_app directly, not by `python -m service`, is the only one.
        workers = self.workers if isinstance(self.workers, int) else 1
        return max(1, available_cores() // workers)

    def resolved_torch_threads(self) -> int:
        """Each worker's share of the cores, so that workers x threads never oversubscribes
        them: an intra-op thread that loses its core stalls the whole forward pass."""
        return self.torch_threads or self._cores_per_worker()

    def engine_torch_threads(self) -> int:
        """The engine process's torch threads (they matter on the CPU only): the cores the
        workers leave over, at least one."""
        workers = self.workers if isinstance(self.workers, int) else 1
        return self.torch_threads or max(1, available_cores() - workers)

    def resolved_decode_workers(self) -> int:
        return self.decode_workers or min(4, self._cores_per_worker())
