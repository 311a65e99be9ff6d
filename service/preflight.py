"""What ``python -m service`` learns before it starts workers, in a short-lived child process.

With several workers, each worker process loads its own copy of the bundle, and the
supervisor that starts them serves nothing. Checking the bundle there first still stops a
bad start with one clear line, and ``OODSERVE_WORKERS=auto`` needs to know whether CUDA is
there; but torch alone makes up a large part of a process's resident memory, which the
supervisor would keep for good. A child process finds both out and exits instead. This
module imports nothing heavy, so that the supervisor stays small.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from service.settings import Settings


class Preflight(NamedTuple):
    problem: str | None  # why the service cannot start (bundle or device), or None
    cuda: bool  # whether the workers will run on CUDA


def preflight(settings: Settings) -> Preflight:
    """Check the bundles to serve (OODSERVE_BUNDLE, or the model repository; their
    signatures too, given OODSERVE_BUNDLE_PUBLIC_KEY) and where OODSERVE_DEVICE will run.
    Runs in the child."""
    from service.model_registry import check_models, serving_what
    from training.bundle import BundleError
    from training.runtime import select_device

    try:
        check_models(settings)
    except BundleError as exc:
        return Preflight(f"cannot serve {serving_what(settings)}: {exc}", False)
    try:
        return Preflight(None, select_device(settings.device).type == "cuda")
    except ValueError as exc:
        return Preflight(f"OODSERVE_DEVICE: {exc}", False)


def _report(answer: Connection, settings: Settings) -> None:
    answer.send(preflight(settings))


def preflight_in_child(settings: Settings) -> Preflight:
    """:func:`preflight`, run in a fresh process that takes its memory with it. The child
    does not see a Ctrl-C (:func:`~service.workers.sigint_blocked`); this process does, and
    then stops the child at once instead of waiting for its check."""
    from service.workers import sigint_blocked

    context = multiprocessing.get_context("spawn")
    receive, answer = context.Pipe(duplex=False)
    child = context.Process(target=_report, args=(answer, settings),
                            name="oodserve-preflight")
    try:
        with sigint_blocked():  # a SIGINT that came meanwhile is raised on leaving
            child.start()
        answer.close()
        return receive.recv()
    except EOFError:
        child.join()
        return Preflight(f"the start-up check exited with {child.exitcode}", False)
    finally:
        if child.is_alive():  # interrupted
            child.kill()
        if child.pid is not None:
            child.join()
        receive.close()
