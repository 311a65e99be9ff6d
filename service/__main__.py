"""``python -m service``: check the settings and the bundle, then run uvicorn.

The bundle is checked here, before uvicorn starts, so that a bad one stops the start with
one line saying what is wrong instead of a traceback from each worker. With one worker the
loaded bundle is served as is. With several, each worker process loads its own copy, the
check runs in a child process (:mod:`service.preflight`), the workers are run by
:mod:`service.workers` (one listening socket each, so that connections spread evenly), and
they share their metrics through ``PROMETHEUS_MULTIPROC_DIR`` (wiped first: files left by an earlier run
would otherwise be counted again).
"""

from __future__ import annotations

import copy
import logging.config
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from service.preflight import bundle_problem_in_child
from service.settings import Settings
from service.workers import run_workers


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


def main() -> None:
    settings = _settings()
    bundle = None
    if settings.workers == 1:
        from training.bundle import BundleError, load_bundle

        try:
            bundle = load_bundle(settings.bundle)
        except BundleError as exc:
            problem = str(exc)
        else:
            problem = None
    else:
        problem = bundle_problem_in_child(str(settings.bundle))
    if problem is not None:
        sys.exit(f"oodserve: cannot serve the bundle {settings.bundle} (OODSERVE_BUNDLE): "
                 f"{problem}")

    options = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
               "access_log": settings.access_log,
               "log_config": _log_config(settings.log_level)}
    if settings.workers > 1 or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        _fresh_metrics_dir()
    if settings.workers == 1:
        import uvicorn

        from service.app import create_app

        uvicorn.run(create_app(settings, bundle), **options)
    else:
        logging.config.dictConfig(options["log_config"])
        sys.exit(run_workers(settings.workers, options))


if __name__ == "__main__":
    main()
