"""What starts a reload of the served models (:meth:`ModelRegistry.reload
<service.model_registry.ModelRegistry.reload>`), besides ``POST /admin/reload``: SIGHUP.

A single-process service reloads on SIGHUP itself. With several workers, the supervisor
(:mod:`service.workers`) takes SIGHUP and sends it on to every worker, and a worker that
answers ``POST /admin/reload`` sends SIGHUP to the supervisor (its pid is in
:data:`SUPERVISOR_ENV`) so that the others reload too. Until a process has installed its
handler (while it imports and loads), a SIGHUP is remembered (:func:`defer_sighup`, set by
``python -m service`` and, for the workers, by the fork server they are forked from,
:mod:`service.preload`) rather than left to its default action, which would kill the
process; the process reloads once it is up, since the files the SIGHUP announces may have
been completed after it read them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from service.model_registry import ModelRegistry
    from service.schemas import ModelReload

log = logging.getLogger("oodserve")

# Set by service.workers for its workers: the supervisor's pid, to whom a worker hands on
# a reload that came to it over HTTP.
SUPERVISOR_ENV = "OODSERVE_SUPERVISOR_PID"


def summary(report: list[ModelReload]) -> str:
    return ", ".join(f"{e.name or '?'} {e.result}"
                     + (f" {e.version}" if e.result == "loaded" else "") for e in report)


_deferred = threading.Event()  # a SIGHUP came before reload_on_sighup was set up


def defer_sighup() -> None:
    """Until :func:`reload_on_sighup` is set up, remember a SIGHUP instead of dying of it
    (its default action): a process still starting may have read the repository before
    the files that SIGHUP announces were complete, so it reloads once it is up."""
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _deferred.set())


def reload_on_sighup(registry: ModelRegistry) -> Callable[[], None]:
    """Reload ``registry`` on each SIGHUP to this process (a SIGHUP during a reload waits
    for it and then scans again); returns the function that removes the handler. Nothing
    is installed when the event loop is not in the main thread (no signals there)."""
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    tasks: set[asyncio.Task] = set()

    async def reload() -> None:
        log.info("SIGHUP: reloading the models")
        report = await registry.reload()
        log.info("reload done: %s", summary(report))

    def hangup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    if _deferred.is_set():  # announced while this process was starting
        _deferred.clear()
        hangup()

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # shutting down: no reload, no death
        for task in tasks:
            task.cancel()

    return remove


def ask_supervisor() -> Literal["none", "signalled", "not_signalled"]:
    """Ask the supervisor, if this process is one of its workers, to reload every worker."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if not pid:
        return "none"
    try:
        os.kill(int(pid), signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.error("cannot ask the supervisor %s to reload the other workers: %s", pid, exc)
        return "not_signalled"
    return "signalled"
