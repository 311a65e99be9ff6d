"""bench/model_alone.py runs on a fresh clone, on whatever device is here."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_model_alone_prints_each_layout_and_batch(tiny_bundle):
    out = subprocess.run(
        [sys.executable, "bench/model_alone.py", "--bundle", str(tiny_bundle), "--batches",
         "1,4", "--seconds", "0.05", "--both-layouts", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("float32")]
    # The CPU serves float32 in NHWC (the layout it chooses, first) and is compared with NCHW.
    assert [line.split()[1] for line in lines] == ["NHWC", "NCHW"], out
    for line in lines:
        assert " b1 " in line and " ms" in line and " b4 " in line and "img/s" in line, line
