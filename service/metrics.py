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

Several models (:mod:`service.model_registry`): the series of images carry the ``model``
and ``version`` that scored them; those of the queue and the batches (:class:`Pipeline`:
queue wait, forward-pass time, batch size) only the ``model``, so that a reload adds none
of them (a version's effect on latency shows in the time series, at the reload). Each
served (model, version) has its own :class:`Metrics` in its own registry, because its score
histograms have their own buckets (the quantiles of its own calibration) and
prometheus_client gives all the series of a metric the same buckets;
:class:`ServiceMetrics` holds the HTTP series and writes one exposition, merging the
models' families by name (a histogram's buckets may differ from one label set to another;
``histogram_quantile`` and ``sum by (le, model)`` work per series). The series of a version
that was reloaded away stay (counters do not go back), its ``oodserve_model_info`` turns 0:
the gauge is 1 exactly for the versions served now.

With several worker processes, prometheus_client's multiprocess mode is used when
``PROMETHEUS_MULTIPROC_DIR`` is set (``python -m service`` sets and wipes it): each worker
writes its values to files there and ``/metrics`` merges them, whichever worker answers; its
merge sums histogram buckets per label set, so per-model buckets hold there too. That mode
has no Info metric, so the model is described by a gauge ``oodserve_model_info`` with value
1, in ``livemax`` mode so that the series of dead workers disappear.
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


MODEL_LABELS = ("model", "version")


class Pipeline:
    """The queue's and the batches' histograms, labelled by model name only: one set per
    process, shared by every version of a model (a version reloaded in does not start new
    series; in multiprocess mode two objects must never write one series)."""

    def __init__(self, registry: CollectorRegistry):
        self.queue_wait = Histogram(
            "oodserve_queue_wait_seconds", "Time an image waited for its forward pass",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_duration = Histogram(
            "oodserve_inference_duration_seconds", "Time of one batched forward pass",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "oodserve_batch_size", "Images per forward pass", ["model"],
            buckets=BATCH_SIZE_BUCKETS, registry=registry)


class _ForModel:
    """A labelled metric with the model's labels filled in: ``labels(detector)`` gives the
    series of that detector for this model."""

    def __init__(self, metric, model: tuple[str, str]):
        self._metric, self._model = metric, model

    def labels(self, *values: str):
        return self._metric.labels(*self._model, *values)


class Metrics:
    """The series of one served (model, version): what its images and batches did. The
    batches' go to ``pipeline`` (the process's, shared by the versions; by default this
    registry's own)."""

    def __init__(self, manifest: Manifest, pipeline: Pipeline | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        model = (manifest.name, manifest.version)
        pipeline = pipeline or Pipeline(r)
        self.queue_wait = pipeline.queue_wait.labels(manifest.name)
        self.inference_duration = pipeline.inference_duration.labels(manifest.name)
        self.batch_size = pipeline.batch_size.labels(manifest.name)
        self.predictions = Counter(
            "oodserve_predictions", "Images scored", MODEL_LABELS, registry=r).labels(*model)
        self.ood_decisions = _ForModel(Counter(
            "oodserve_ood_decisions", "Images judged OOD at the bundle's default thresholds "
            "(combined: under the bundle's default rule)", (*MODEL_LABELS, "detector"),
            registry=r), model)
        self.scores = {
            d.name: Histogram(
                f"oodserve_{d.name}_score", f"{d.title} scores ({d.direction})", MODEL_LABELS,
                buckets=score_buckets(manifest, d.name), registry=r).labels(*model)
            for d in SERVED}
        self.image_errors = _ForModel(Counter(
            "oodserve_image_errors", "Images rejected, by reason", (*MODEL_LABELS, "reason"),
            registry=r), model)
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

    def describe_model(self, device: str, dtype: str, served: bool = True) -> None:
        """Set ``oodserve_model_info`` once the device is known (in the engine layout, a
        worker learns it when it connects to the engine); 0 once the version is no longer
        served (reloaded away)."""
        m = self._manifest
        self.model_info.labels(m.name, m.version, m.architecture.name,
                               m.featurenorm.selected_block, device, dtype).set(int(served))

    def mark_process_dead(self) -> None:
        """Drop this process's live gauges (its counters stay, as Prometheus expects). At
        the end of the process only: the files are the whole process's, every model's."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())


class _Merged:
    """The families of several registries as one collector, same-named ones merged."""

    def __init__(self, registries: list[CollectorRegistry]):
        self.registries = registries

    def collect(self):
        families = {}
        for registry in self.registries:
            for family in registry.collect():
                kept = families.setdefault(family.name, family)
                if kept is not family:
                    kept.samples.extend(family.samples)
        return families.values()


class ServiceMetrics:
    """The process's metrics: the HTTP series, model reloads, and each model's
    :class:`Metrics` (:meth:`for_model`), written out by :meth:`render`."""

    def __init__(self):
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "oodserve_requests", "HTTP requests by route template and status code",
            ["endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "oodserve_request_duration_seconds", "Time from request start to response end",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_reloads = Counter(
            "oodserve_model_reloads", "Models reloaded by this process (loaded: a new or "
            "changed bundle now serves; refused: it failed its checks and the old one keeps "
            "serving; removed: no longer in the repository)", ["result"], registry=r)
        for result in ("loaded", "refused", "removed"):
            self.model_reloads.labels(result)
        self._pipeline = Pipeline(r)
        self._models: dict[tuple[str, str], Metrics] = {}

    def for_model(self, manifest: Manifest) -> Metrics:
        """The series of ``manifest``'s (name, version), made on first use. A bundle
        changed without a new version keeps counting in the same series (and the buckets
        of the first one), so that no series is ever written twice."""
        key = (manifest.name, manifest.version)
        if key not in self._models:
            self._models[key] = Metrics(manifest, self._pipeline)
        return self._models[key]

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(_Merged(
                [self.registry, *(m.registry for m in self._models.values())]))
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def mark_process_dead(self) -> None:
        """At the end of the process: see :meth:`Metrics.mark_process_dead`."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())
