"""Imported once by the server process that forks the workers (:mod:`service.workers`).

Everything a worker needs is imported here, before any worker exists, and then frozen out of
the garbage collector's reach: a collection in a worker would otherwise write to the header
of every object it walks, and so copy each shared page into the worker's private memory.

SIGHUP is deferred here (:func:`service.reload.defer_sighup`), and so in every worker forked
from here until the worker sets up its reload handler: the supervisor sends SIGHUP on to
every worker, one that is still starting included, whom the default action would kill; such
a worker reloads once it is up instead. The supervisor's own handler does not reach this
process (a caught signal reverts to its default across exec).
"""

import gc

import service.app  # noqa: F401 - imported for its side effect: the modules are loaded
from service.reload import defer_sighup

defer_sighup()
gc.collect()
gc.freeze()
