"""Imported once by the server process that forks the workers (:mod:`service.workers`).

Everything a worker needs is imported here, before any worker exists, and then frozen out of
the garbage collector's reach: a collection in a worker would otherwise write to the header
of every object it walks, and so copy each shared page into the worker's private memory.
"""

import gc

import service.app  # noqa: F401 - imported for its side effect: the modules are loaded

gc.collect()
gc.freeze()
