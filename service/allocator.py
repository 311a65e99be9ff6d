"""glibc ``malloc`` thresholds for forward passes on the CPU.

Why: each operator of a forward pass allocates its output and frees tensors it no longer
needs, so a batched pass allocates and frees megabytes many times over. With glibc's
defaults, blocks over 128 KiB come from ``mmap`` and free memory above the top of the heap
is handed back to the kernel past a trim threshold; glibc raises both thresholds as it sees
larger blocks freed, but only to the size of one block (trim: twice that), well under the
memory a batched pass churns through. Either way the pages go back to the kernel and the
next pass faults them in again, zeroed. A batch of 8 CIFAR images makes 512 KiB tensors in
the first stage of ResNet-56; a single image's tensors (64 KiB) stay under the default
threshold, so only batches pay, and the larger the batch the more.

Both thresholds are set, or neither: setting either one turns glibc's adjustment of both
off, and setting only one made batched passes slower than the defaults. The measurements
are in docs/benchmarks.md.

The thresholds are process-wide, so :func:`tune_malloc` is called once per worker before
the model is warmed up. It changes nothing when ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` are set (the operator's choice wins), off glibc, or with
``OODSERVE_TUNE_MALLOC=false``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("oodserve")

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to 16 MiB come from the heap (glibc's ceiling for this is 32 MiB); up to 64 MiB
# of free memory stays with the process, a bound on what it holds beyond its working set.
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Set both thresholds; True when they were set."""
    overridden = [v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                  if v in os.environ]
    if overridden:
        log.info("malloc thresholds left as %s set them", " and ".join(overridden))
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not ok:
        log.warning("glibc refused the malloc thresholds; forward passes keep its defaults")
    return ok
