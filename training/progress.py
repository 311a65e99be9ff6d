"""Progress bars for the offline steps that take more than a few seconds.

Checking a dataset's images, scoring a test set, NormRatio over the training images: each can
run for a minute or more on a CPU, and a silent terminal looks hung. The bars go to stderr
(stdout keeps the reports) and only when stderr is a terminal (``disable=None``), so logs and
CI output stay free of carriage-return noise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None,
             unit: str = "batch") -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, disable=None,
                dynamic_ncols=True)


def step(message: str) -> None:
    """One line on stderr as a long step starts, so a log shows where the time went."""
    print(message, file=sys.stderr, flush=True)
