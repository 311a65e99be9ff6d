"""``python -m service``: check the settings and the bundle, then run uvicorn.

The settings come from the command line, ``OODSERVE_*`` environment variables, a ``.env``
file and the defaults, in that order of precedence (``python -m service --help`` lists them).
They are resolved here, once: the worker and engine processes are handed the resolved
:class:`~service.settings.Settings` instead of reading the environment again.

The bundle is checked here, before uvicorn starts, so that a bad one stops the start with
one line saying what is wrong instead of a traceback from each worker. With one worker
(``--workers 1``) in the replicated layout the loaded bundle is served as is, in this
process. Otherwise the check, and whether CUDA is there (which decides ``auto``), run in a
child process (:mod:`service.preflight`); the workers, and in the engine layout the engine
process, are run by :mod:`service.workers` (one listening socket per worker, so that
connections spread evenly), and they share their metrics through
``PROMETHEUS_MULTIPROC_DIR`` (wiped first: files left by an earlier run would otherwise be
counted again).

Ctrl-C, without a traceback from any process: while the settings and the bundle are being
checked, it stops the start with one line and exit status 130; once the processes are
started (or uvicorn runs, with one worker), it stops the service as SIGTERM does, answering
the requests in flight, and the exit status is 0. Child processes are started with SIGINT
blocked, so that a Ctrl-C, which reaches the whole process group, is handled by this
process alone.
"""

from __future__ import annotations

import argparse
import copy
import logging.config
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the functions: a Ctrl-C during the imports stays quiet
    from service.settings import Settings

log = logging.getLogger("oodserve")

PROG = "python -m service"
DESCRIPTION = """\
Serve an image classifier with out-of-distribution scores over HTTP (FastAPI on uvicorn).

Every setting is a flag below and also an environment variable (OODSERVE_<NAME>, shown in
brackets), which may also sit in a .env file in the working directory. Precedence: flags,
then environment variables, then .env, then the defaults."""
EPILOG = """\
--api-key on the command line is visible to other users of the machine (ps); prefer
OODSERVE_API_KEY in the environment or in a .env file readable by the service only.

Ctrl-C or SIGTERM stops the service after answering the requests in flight."""


def _settings(argv: Sequence[str] = ()) -> Settings:
    """The settings from ``argv`` (flags), the environment, .env and the defaults. ``--help``
    prints them and exits 0; an unknown flag or a missing value exits 2 (argparse); a value
    that does not validate exits 1 with one line per setting, naming flag and variable."""
    from pydantic import ValidationError
    from pydantic_settings import CliSettingsSource

    from service.settings import Settings

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    cli = CliSettingsSource(Settings, root_parser=parser, cli_kebab_case=True,
                            cli_implicit_flags=True, cli_show_env_vars=True,
                            cli_hide_none_type=True, cli_avoid_json=True)
    try:
        return Settings(_cli_settings_source=cli(args=list(argv)))
    except ValidationError as exc:
        problems: dict[str | None, list[str]] = {}
        for error in exc.errors():  # no loc: a rule between settings (a model validator)
            problems.setdefault(str(error["loc"][0]) if error["loc"] else None,
                                []).append(error["msg"])
        lines = [(f"  --{name.replace('_', '-')} / OODSERVE_{name.upper()}: " if name
                  else "  ") + "; ".join(dict.fromkeys(messages))
                 for name, messages in problems.items()]
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
    from service.model_registry import check_models, serving_what
    from training.bundle import BundleError

    try:
        return check_models(settings)
    except BundleError as exc:
        sys.exit(f"oodserve: cannot serve {serving_what(settings)}: {exc}")


def _serve(argv: Sequence[str]) -> None:
    from service.preflight import preflight_in_child
    from service.reload import defer_sighup
    from service.workers import run_workers

    # SIGHUP reloads the models once a process has set up its handler (service.reload);
    # until then it must not kill this process, and is remembered for later.
    defer_sighup()
    settings = _settings(argv)
    bundle = None
    if settings.workers == 1 and settings.layout == "replicated":
        bundle = _load(settings)
        workers, layout = 1, "replicated"
    else:
        check = preflight_in_child(settings)
        if check.problem is not None:
            sys.exit(f"oodserve: {check.problem}")
        workers = settings.resolved_workers(check.cuda)
        layout = settings.resolved_layout(check.cuda)
        if layout == "engine" and settings.model_repository is not None:
            sys.exit("oodserve: --model-repository (OODSERVE_MODEL_REPOSITORY) is not "
                     "supported in the engine layout, whose engine process hosts one model: "
                     "set --layout replicated (OODSERVE_LAYOUT=replicated), or serve one "
                     "bundle (OODSERVE_BUNDLE)")

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

        # uvicorn turns SIGINT into a graceful shut-down, raises it again once done, and
        # takes the KeyboardInterrupt that follows as the end: exit status 0.
        app = create_app(settings, bundle or _load(settings))
        bundle = None  # the app's now: a reload must be able to release it
        uvicorn.run(app, **options)
    else:
        # The workers are handed the resolved settings, with the number of workers decided.
        settings = settings.model_copy(update={"workers": workers})
        logging.config.dictConfig(options["log_config"])
        log.info("starting %d worker processes%s", workers,
                 " and the engine process" if engine else "")
        sys.exit(run_workers(workers, options, engine, settings))


def main(argv: Sequence[str] | None = None) -> None:
    """Serve with the settings from ``argv`` (default: the command line)."""
    try:
        _serve(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # while checking; later on a Ctrl-C is a graceful stop
        print("oodserve: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
