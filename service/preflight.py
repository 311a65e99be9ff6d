"""The start-up check of a bundle for a multi-worker start, in a short-lived child process.

With several workers, each worker process loads its own copy of the bundle, and the
supervisor that starts them serves nothing. Checking the bundle there first still stops a
bad start with one clear line, but torch alone makes up about 0.5 GB of a process's
resident memory, which the supervisor would keep for good; a child process checks it and
exits instead. This module imports nothing heavy, so that the supervisor stays small.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def bundle_problem(path: str) -> str | None:
    """Why the bundle at ``path`` cannot be served, or None. Runs in the child."""
    from training.bundle import BundleError, load_bundle

    try:
        load_bundle(path)
    except BundleError as exc:
        return str(exc)
    return None


def bundle_problem_in_child(path: str) -> str | None:
    """:func:`bundle_problem`, run in a fresh process that takes its memory with it."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(bundle_problem, path).result()
