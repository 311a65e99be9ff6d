"""Shared fixtures: paths to the real data and weights beside the repository."""

import hashlib
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10.tar.gz"
ISUN = SHARED / "data" / "isun.tar.gz"
TINY_AUX = SHARED / "data" / "tinyimagenet-aux.tar.gz"
RESNET20 = SHARED / "checkpoints" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Extraction cache for the tests; reuses OODSERVE_CACHE when set to save time."""
    return Path(os.environ.get("OODSERVE_CACHE") or tmp_path_factory.mktemp("cache"))


def digest(tensors) -> str:
    """sha256 over named tensors, to compare weights bit for bit."""
    h = hashlib.sha256()
    for name, value in sorted(tensors):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
