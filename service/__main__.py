"""``python -m service``: check the settings and the bundle, then run uvicorn.

The bundle is checked here, before uvicorn starts, so that a bad one stops the start with
one line saying what is wrong instead of a traceback from each worker. With
``OODSERVE_WORKERS=1`` and ``OODSERVE_LAYOUT=replicated`` the loaded bundle is served as is,
in this process. Otherwise the check, and whether CUDA is there (which decides ``auto``),
run in a child process (:mod:`service.preflight`); the workers, and in the engine layout the
engine process, are run by :mod:`service.workers` (one listening socket per worker, so that
connections spread evenly), and they share their metrics through
``PROMETHEUS_MULTIPROC_DIR`` (wiped first: files left by an earlier run would otherwise be
counted again).
"""

from __future__ import annotations

import copy
import logging.config
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from service.preflight import preflight_in_child
from service.settings import Settings
from service.workers import run_workers

log = logging.getLogger("oodserve")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  OODSERVE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                 for e in exc.errors()]
        sys.exit("oodserve: invalid settings:\n" + "\n".join(lines))


def _fresh_metrics_dir() -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="oodserve-metrics-")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _log_config(level: str) -> dict:
    """uvicorn's logging set-up plus the service's own logger, in every worker."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["oodserve"] = {"handlers": ["default"], "level": level.upper(),
                                     "propagate": False}
    return config


def _load(settings: Settings):
    from training.bundle import BundleError, load_bundle

    try:
        return load_bundle(settings.bundle)
    except BundleError as exc:
        sys.exit(f"oodserve: cannot serve the bundle {settings.bundle} (OODSERVE_BUNDLE): "
                 f"{exc}")


def main() -> None:
    settings = _settings()
    bundle = None
    if settings.workers == 1 and settings.layout == "replicated":
        bundle = _load(settings)
        workers, layout = 1, "replicated"
    else:
        check = preflight_in_child(str(settings.bundle), settings.device)
        if check.problem is not None:
            sys.exit(f"oodserve: {check.problem}")
        workers = settings.resolved_workers(check.cuda)
        layout = settings.resolved_layout(check.cuda)

    options = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
               "access_log": settings.access_log,
               # No `server: uvicorn`; the head limits and JSON errors of service.http_protocol.
               "server_header": False, "http": "service.http_protocol:HttpProtocol",
               "log_config": _log_config(settings.log_level)}
    engine = layout == "engine"
    if workers > 1 or engine or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        _fresh_metrics_dir()
    if workers == 1 and not engine:  # `auto` on one core comes here without a bundle yet
        import uvicorn

        from service.app import create_app

        uvicorn.run(create_app(settings, bundle or _load(settings)), **options)
    else:
        # The workers read their settings from the environment: give them the number.
        os.environ["OODSERVE_WORKERS"] = str(workers)
        logging.config.dictConfig(options["log_config"])
        log.info("starting %d worker processes%s", workers,
                 " and the engine process" if engine else "")
        sys.exit(run_workers(workers, options, engine))


if __name__ == "__main__":
    main()
