"""Prometheus metrics, named by Prometheus conventions (``oodserve_`` prefix, base units).

Label values never come from a request: ``endpoint`` is the route template, ``status`` the
response code, ``detector`` and ``reason`` fixed sets. Each detector's scores get their own
histogram (summing energies and norms across a label would be meaningless, and each needs
its own buckets); the energy histogram has no ``_sum`` because prometheus_client leaves it
out when bucket bounds are negative, so read it with ``histogram_quantile``. OOD decisions
are counted at the bundle's default thresholds (and its default rule for ``combined``)
whatever a client asked for, so that
``rate(oodserve_ood_decisions_total[5m]) / rate(oodserve_predictions_total[5m])`` follows
the inputs rather than the clients' threshold choices.

With several worker processes, prometheus_client's multiprocess mode is used when
``PROMETHEUS_MULTIPROC_DIR`` is set (``python -m service`` sets and wipes it): each worker
writes its values to files there and ``/metrics`` merges them, whichever worker answers.
That mode has no Info metric, so the model is described by a gauge ``oodserve_model_info``
with value 1, in ``livemax`` mode so that the series of dead workers disappear.
"""

from __future__ import annotations

import os

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from training.bundle import Manifest
from training.detectors import SERVED, SERVED_NAMES

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .0075, .01, .015, .025, .05, .075, .1, .25, .5,
                   1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Where the score buckets sit: these quantiles of each detector's calibration ID scores.
SCORE_BUCKET_QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
IMAGE_ERROR_REASONS = ("empty_file", "not_an_image", "corrupt_image", "too_many_pixels")

# The *_created series double the output for nothing a dashboard uses (and multiprocess
# mode has none): leave them out, for this service process as a whole.
disable_created_metrics()


def score_buckets(manifest: Manifest, detector: str) -> list[float]:
    """Bucket bounds where the detector's ID scores lie, so that a drifting score
    distribution shows up in its histogram."""
    table = manifest.calibration[detector].quantiles
    values = np.interp(SCORE_BUCKET_QUANTILES, table.probabilities, table.values)
    return sorted({float(f"{v:.4g}") for v in values})


class Metrics:
    def __init__(self, manifest: Manifest):
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "oodserve_requests", "HTTP requests by route template and status code",
            ["endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "oodserve_request_duration_seconds", "Time from request start to response end",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "oodserve_queue_wait_seconds", "Time an image waited for its forward pass",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "oodserve_inference_duration_seconds", "Time of one batched forward pass",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "oodserve_batch_size", "Images per forward pass", buckets=BATCH_SIZE_BUCKETS,
            registry=r)
        self.predictions = Counter(
            "oodserve_predictions", "Images scored", registry=r)
        self.ood_decisions = Counter(
            "oodserve_ood_decisions", "Images judged OOD at the bundle's default thresholds "
            "(combined: under the bundle's default rule)", ["detector"], registry=r)
        self.scores = {
            d.name: Histogram(
                f"oodserve_{d.name}_score", f"{d.title} scores ({d.direction})",
                buckets=score_buckets(manifest, d.name), registry=r)
            for d in SERVED}
        self.image_errors = Counter(
            "oodserve_image_errors", "Images rejected, by reason", ["reason"], registry=r)
        self.model_info = Gauge(
            "oodserve_model_info", "The served model (value 1)",
            ["name", "version", "architecture", "selected_block", "device", "dtype"],
            multiprocess_mode="livemax", registry=r)
        # Zero-valued series exist from the start, so rates never see a series appear.
        for detector in (*SERVED_NAMES, "combined"):
            self.ood_decisions.labels(detector)
        for reason in IMAGE_ERROR_REASONS:
            self.image_errors.labels(reason)
        self._manifest = manifest

    def describe_model(self, device: str, dtype: str) -> None:
        """Set ``oodserve_model_info`` once the device is known (in the engine layout, a
        worker learns it when it connects to the engine)."""
        m = self._manifest
        self.model_info.labels(m.name, m.version, m.architecture.name,
                               m.featurenorm.selected_block, device, dtype).set(1)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def mark_process_dead(self) -> None:
        """Drop this worker's live gauges (its counters stay, as Prometheus expects)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())
