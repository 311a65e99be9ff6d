"""Admission control: a request is admitted or shed as a whole, before any of its images is
decoded.

Refusing an image only when it reaches a full queue wastes the work already done on it (the
body parsed, the image decoded) and, for a batch request, on its other images, which may be
scored for a request that is answered 503 anyway. So each request reserves a place for all
its images up front (:meth:`Admission.admit`); a request that does not fit is answered 503
``overloaded`` with ``Retry-After`` before anything is decoded, and an admitted one keeps its
places until each image is done, so that what is admitted is what gets scored.

Two bounds, both per process and per served model:

- by count: images waiting for the model (admitted, less those in the forward pass now) at
  most ``OODSERVE_MAX_QUEUE_SIZE``;
- by time: the expected wait of the request's last image, i.e. the images ahead of it and its
  own divided by the measured throughput, at most ``OODSERVE_MAX_QUEUE_WAIT_MS``. A count
  alone is the wrong unit: how long 1,024 queued images take depends on the device, the batch
  size and how many workers share the cores, and a client waiting many seconds for an answer
  it has given up on is worse off than one told to retry. The throughput is an exponentially
  weighted average of images per second over the scorer's completed batches
  (:class:`Throughput`), each timed from the previous one's end when images were waiting or
  being decoded then, so that it follows decoding too when decoding is the bottleneck; it
  starts from a full batch timed at warm-up (in the engine layout, the worker has no such
  pass and waits for a few answers instead). While less than one full batch is outstanding
  the time bound does not apply: those images go in one forward pass whatever the estimate
  says, and at low load the measured rate (small batches) understates what the model does
  under load.

A reservation (:class:`Reservation`) is given back image by image as each is scored or fails,
and the rest when the request ends (:meth:`Reservation.close`, or when it is garbage, so that a
caller that forgets cannot leak places).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Protocol

from service.errors import ServiceError


class Throughput:
    """Images per second the scorer completes, exponentially weighted over its batches (each
    batch a sample: its images over the time it took)."""

    WEIGHT = 0.2  # of the newest batch: a few batches follow a change of load or device
    # Batches measured before the rate is used, unless it was seeded: the first passes at
    # each new batch size are slow (the CPU's convolution kernels are prepared per input
    # shape), and a rate that still holds them much would shed requests at the start of a
    # load that the model keeps up with (after 8, the first batch weighs 0.8 ** 7 = 0.21).
    SETTLE = 8

    def __init__(self) -> None:
        self.rate: float | None = None  # None until a batch has completed
        self.batches = 0
        self.seeded = False

    def seed(self, images: int, seconds: float) -> None:
        """Start from a warm full batch timed at warm-up: the model's own pace, faster than
        the service's under load (no decoding), which the batches then pull it down to."""
        self.record(images, seconds)
        self.seeded = self.rate is not None

    @property
    def settled_rate(self) -> float | None:
        """:attr:`rate` once seeded or :data:`SETTLE` batches have been measured, else
        None."""
        return self.rate if self.seeded or self.batches >= self.SETTLE else None

    def record(self, images: int, seconds: float) -> None:
        if images <= 0 or seconds <= 0:
            return
        self.batches += 1
        sample = images / seconds
        self.rate = sample if self.rate is None else self.rate + self.WEIGHT * (
            sample - self.rate)


class Overloaded(ServiceError):
    def __init__(self, retry_after_s: int, why: str):
        super().__init__(503, "overloaded", f"{why}; retry shortly",
                         headers={"Retry-After": str(retry_after_s)})


class Refusal(NamedTuple):
    """Why images are refused: what :class:`Overloaded` is made of, without the exception
    (the shedder answers most refusals from a cache keyed by it: :mod:`service.shedding`)."""

    retry_after_s: int
    why: str

    def error(self) -> Overloaded:
        return Overloaded(self.retry_after_s, self.why)


class Scorer(Protocol):
    """What admission needs of a scorer (:mod:`service.engine`'s, either layout)."""

    throughput: Throughput
    max_batch_size: int  # images one forward pass takes

    def in_forward_pass(self) -> int:
        """Images being scored now, which no longer wait."""


class Admission:
    """The places of one scorer's queue: what is admitted and not yet done."""

    def __init__(self, scorer: Scorer, max_queued: int, max_wait_s: float, sharers: int = 1):
        self.scorer = scorer
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        # Processes whose images share the scorer's batches (the workers, in the engine
        # layout): this process's part of a full batch is its share of one.
        self.sharers = sharers
        self.outstanding = 0  # admitted images not yet done

    def full_batch(self) -> int:
        """This process's images in a full forward pass."""
        return max(1, self.scorer.max_batch_size // self.sharers)

    def expected_wait_s(self, images: int) -> float | None:
        """How long the last of ``images`` more would wait (None: not measured enough yet)."""
        rate = self.scorer.throughput.settled_rate
        return None if not rate else (self.outstanding + images) / rate

    def refusal(self, images: int) -> Refusal | None:
        """Why ``images`` more images would be refused now (None: they fit); reserves
        nothing."""
        waiting = self.outstanding - self.scorer.in_forward_pass()
        if waiting + images > self.max_queued:
            return Refusal(self._retry_after(), f"{images} more images do not fit the queue "
                           f"({waiting} waiting, OODSERVE_MAX_QUEUE_SIZE {self.max_queued})")
        wait = self.expected_wait_s(images)
        if (wait is not None and wait > self.max_wait_s
                and self.outstanding + images > self.full_batch()):
            return Refusal(self._retry_after(), f"the expected wait ({wait:.1f} s) is over "
                           f"OODSERVE_MAX_QUEUE_WAIT_MS ({self.max_wait_s * 1000:g} ms)")
        return None

    def admit(self, images: int, head: Reservation | None = None) -> Reservation:
        """Places for ``images`` images, or :class:`Overloaded` if they do not fit. ``head``:
        the place taken for the request when its head came in (:mod:`service.shedding`),
        which counts as one of them when it is this admission's; otherwise it is given
        back."""
        if head is not None and (head.admission is not self or head.closed):
            head.close()  # taken on a model version that a reload has retired since
            head = None
        more = images if head is None else images - head.held
        if more > 0 and (refused := self.refusal(more)) is not None:
            if head is not None:
                head.close()
            raise refused.error()
        self.outstanding += max(more, 0)
        if head is None:
            return Reservation(self, images)
        head.grow(max(more, 0))
        return head

    def _retry_after(self) -> int:
        """Whole seconds until what is outstanding now should be done (at least 1)."""
        wait = self.expected_wait_s(0)
        return max(1, math.ceil(wait)) if wait else 1

    def _release(self, held: list[int], images: int | None) -> None:
        images = held[0] if images is None else min(images, held[0])
        if not images:  # nothing to give back: above all, no write from the finalizer's thread
            return
        held[0] -= images
        self.outstanding -= images


class Reservation:
    """One request's places; each is given back once (:meth:`release`, :meth:`close`)."""

    def __init__(self, admission: Admission, images: int):
        self.admission = admission
        self._held = [images]  # shared with the finalizer, which must not hold self
        self._release = admission._release
        self._finalizer = weakref.finalize(self, admission._release, self._held, None)

    @property
    def held(self) -> int:
        return self._held[0]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def grow(self, images: int) -> None:
        """``images`` more places, already counted by the admission (:meth:`Admission.admit`)."""
        self._held[0] += images

    def release(self, images: int = 1) -> None:
        """An image is done (scored, refused or dropped)."""
        self._release(self._held, images)

    def close(self) -> None:
        """The request is over: give back the places of images that never ran."""
        self._finalizer()
