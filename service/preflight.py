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
from pathlib import Path
from typing import NamedTuple


class Preflight(NamedTuple):
    problem: str | None  # why the service cannot start (bundle or device), or None
    cuda: bool  # whether the workers will run on CUDA


def preflight(path: str, device: str, public_key: Path | None = None) -> Preflight:
    """Check the bundle at ``path`` (its signature too, given ``public_key``) and where
    ``device`` will run. Runs in the child."""
    from training.bundle import BundleError, load_bundle
    from training.runtime import select_device

    try:
        load_bundle(path, public_key)
    except BundleError as exc:
        return Preflight(f"cannot serve the bundle {path} (OODSERVE_BUNDLE): {exc}", False)
    try:
        return Preflight(None, select_device(device).type == "cuda")
    except ValueError as exc:
        return Preflight(f"OODSERVE_DEVICE: {exc}", False)


def _report(answer: Connection, path: str, device: str, public_key: Path | None) -> None:
    answer.send(preflight(path, device, public_key))


def preflight_in_child(path: str, device: str, public_key: Path | None = None) -> Preflight:
    """:func:`preflight`, run in a fresh process that takes its memory with it. The child
    does not see a Ctrl-C (:func:`~service.workers.sigint_blocked`); this process does, and
    then stops the child at once instead of waiting for its check."""
    from service.workers import sigint_blocked

    context = multiprocessing.get_context("spawn")
    receive, answer = context.Pipe(duplex=False)
    child = context.Process(target=_report, args=(answer, path, device, public_key),
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
