"""Service settings, from ``OODSERVE_*`` environment variables and an optional ``.env`` file.

Every knob an operator may need is here and nowhere else, so that ``python -m service``
needs no arguments and a container is configured by its environment alone. The ``.env`` file
is read from the working directory; real environment variables win over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Resolved from the package, not the working directory, so `python -m service` serves the
# repository's default model wherever it is started from.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / "models" / "cifar10-resnet20-gregplus"


def available_cores() -> int:
    """CPU cores this process may run on (affinity/cpuset aware, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OODSERVE_", env_file=".env",
                                      env_file_encoding="utf-8", extra="ignore")

    bundle: Path = Field(DEFAULT_BUNDLE, description="model bundle directory")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU")
    half: bool = Field(False, description="float16 weights and inputs (CUDA only)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU per worker; default: the "
                                "available cores shared out between the workers")
    decode_workers: int | None = Field(
        None, ge=1, le=64, description="image decoding threads per worker; default: "
                                       "min(4, that share)")
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per forward pass")
    max_batch_delay_ms: float = Field(
        2.0, ge=0.0, le=1000.0,
        description="longest time the oldest queued image waits for images still being "
                    "decoded to join its batch")
    max_queue_size: int = Field(
        1024, ge=1, description="queued images beyond which requests get 503")
    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="request body limit, checked while streaming")
    max_image_pixels: int = Field(
        25_000_000, ge=64, description="width x height limit of one image before decoding")
    max_batch_images: int = Field(64, ge=1, le=1024, description="images per batch request")
    top_k: int = Field(5, ge=1, description="default number of classes in top_k")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
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

    def _cores_per_worker(self) -> int:
        return max(1, available_cores() // self.workers)

    def resolved_torch_threads(self) -> int:
        """Each worker's share of the cores, so that workers x threads never oversubscribes
        them: an intra-op thread that loses its core stalls the whole forward pass."""
        return self.torch_threads or self._cores_per_worker()

    def resolved_decode_workers(self) -> int:
        return self.decode_workers or min(4, self._cores_per_worker())
