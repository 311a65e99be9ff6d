"""A CPU forward pass while another Python thread is busy: eager against traced, in one run.

    python bench/busy_loop.py [--bundle DIR] [--batch 32] [--threads 1] [--passes 7]

What a worker's inference thread meets when its event loop is saturated (an overload):
another thread of the same process that always wants the GIL. For each of the two ways the
CPU :class:`service.inference.Predictor` can run (``cpu_trace`` off: eager, one Python call
per operator; on: the TorchScript trace that warm-up makes), it times ``--passes`` full
batches through :meth:`Predictor.run` alone, then with a thread spinning in pure Python
beside it, and prints the medians and their ratio. ``--threads``: torch threads, as a
worker gets (its share of the cores; one on the 2-core development machine with 2 workers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import threading
import time

import torch

from service.inference import Predictor
from service.settings import DEFAULT_BUNDLE
from training.bundle import load_bundle


def median_pass_s(predictor: Predictor, batch: int, passes: int) -> float:
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        predictor.run(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def with_busy_thread(fn):
    """``fn()`` while another thread runs Python without pause."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.1)
        return fn()
    finally:
        stop.set()
        spinner.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=7)
    args = parser.parse_args()
    print(f"busy-loop bench {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}"
          f": {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch "
          f"thread(s); bundle {args.bundle}; batch {args.batch}, median of {args.passes}")
    for trace in (False, True):
        predictor = Predictor(load_bundle(args.bundle), "cpu", "float32", args.batch,
                              args.threads, cpu_trace=trace)
        predictor.warm_up([1, args.batch])
        predictor.staging.copy_(torch.randn(predictor.staging.shape))
        alone = median_pass_s(predictor, args.batch, args.passes)
        busy = with_busy_thread(lambda p=predictor: median_pass_s(p, args.batch, args.passes))
        name = "traced" if predictor.traced else "eager"
        print(f"{name:>6}: alone {alone * 1000:8.1f} ms, beside a busy thread "
              f"{busy * 1000:8.1f} ms (x{busy / alone:.2f})")


if __name__ == "__main__":
    main()
