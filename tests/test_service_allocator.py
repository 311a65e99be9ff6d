"""glibc malloc thresholds for CPU inference (service/allocator.py).

Each check runs in a fresh interpreter: the thresholds are process-wide, and glibc's
defaults are what is compared against. What is observed is glibc's own count of blocks it
got from mmap (mallinfo2), so the tests see the allocator's behaviour, not our flags.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from service import allocator
from service.inference import Predictor
from training.bundle import load_bundle

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import ctypes, json
from service.allocator import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

def mmapped_blocks_for(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during - before

tuned = tune_malloc()
print(json.dumps({"tuned": tuned, "mmapped": mmapped_blocks_for(4 << 20)}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True, cwd=os.getcwd()).stdout
    return json.loads(out)


def test_a_4_mib_block_comes_from_the_heap_once_tuned_not_from_mmap():
    # glibc's default: anything over 128 KiB is mmapped (until a larger one is freed).
    assert probe(OODSERVE_TUNE_MALLOC="true") == {"tuned": True, "mmapped": 0}


def test_the_operators_malloc_environment_wins():
    assert probe(MALLOC_MMAP_THRESHOLD_=str(1 << 20)) == {"tuned": False, "mmapped": 1}
    assert probe(MALLOC_TRIM_THRESHOLD_=str(1 << 30))["tuned"] is False


def test_the_predictor_tunes_on_the_cpu_unless_told_not_to(tiny_bundle, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda: calls.append(1) or True)
    bundle = load_bundle(tiny_bundle)
    assert Predictor(bundle, "cpu", "float32", 8, 1).malloc_tuned and calls == [1]
    assert not Predictor(bundle, "cpu", "float32", 8, 1, tune_malloc=False).malloc_tuned
    assert calls == [1]
