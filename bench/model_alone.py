"""The model alone as the service runs it, by precision and memory layout: no HTTP, no batcher.

    python bench/model_alone.py [--bundle DIR] [--device auto] [--batches 1,32,256,1024]
                                [--precisions float32,tf32,float16,bfloat16] [--both-layouts]

For each precision (the CPU serves float32 only), a :class:`service.inference.Predictor` is
built and warmed up as the service builds it (CUDA graphs captured on CUDA; every core as a
torch thread, which on CUDA only serves the host's copies), its
staging batch filled with random images, and for each batch size it prints: images a second
through :meth:`Predictor.run` (batch in host memory, score rows back in host memory, what the
engine does per pass), and on CUDA the captured graph's replay alone (the batch already on
the device). Batch 1 is printed as milliseconds per pass. ``--both-layouts`` also runs each
precision in the layout the service does not choose for it (NCHW against NHWC), which is how
``service.inference.memory_format_for`` was decided.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from service import inference
from service.settings import DEFAULT_BUNDLE, available_cores
from training.bundle import load_bundle
from training.runtime import select_device

LAYOUT_NAMES = {torch.contiguous_format: "NCHW", torch.channels_last: "NHWC"}


def rate(fn, images: int, seconds: float) -> float:
    """Images a second of ``fn`` (which processes ``images`` per call), synchronised."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return calls * images / (time.perf_counter() - start)


def fmt(n: int, img_s: float) -> str:
    return f"{1000 / img_s:.3f} ms" if n == 1 else f"{img_s:,.0f} img/s"


def measure(bundle_dir, device: str, precision: str, layout, batches: list[int],
            seconds: float) -> str:
    chosen = inference.memory_format_for
    inference.memory_format_for = lambda _device, _precision: layout
    try:
        predictor = inference.Predictor(load_bundle(bundle_dir), device, precision,
                                        max(batches), available_cores())
    finally:
        inference.memory_format_for = chosen
    predictor.warm_up(sorted({1, max(batches)}))
    predictor.staging.normal_(generator=torch.Generator().manual_seed(0))
    parts = []
    for n in batches:
        part = f"b{n} {fmt(n, rate(lambda n=n: predictor.run(n), n, seconds))}"
        if n in predictor._graphs:  # the captured graph alone, its batch on the device
            graph = predictor._graphs[n][0]
            part += f" (replay {fmt(n, rate(graph.replay, n, seconds))})"
        parts.append(part)
    return f"{precision:9s} {LAYOUT_NAMES[layout]}  " + "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="1,32,256,1024")
    parser.add_argument("--precisions", default="float32,tf32,float16,bfloat16")
    parser.add_argument("--seconds", type=float, default=0.3, help="per measurement")
    parser.add_argument("--both-layouts", action="store_true")
    args = parser.parse_args()
    device = select_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",") if device.type == "cuda" else ["float32"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(f"machine: {name or platform.machine()}, {available_cores()} cores, torch "
          f"{torch.__version__}; bundle {args.bundle}")
    for precision in precisions:
        layouts = [inference.memory_format_for(device, precision)]
        if args.both_layouts:
            layouts += [other for other in LAYOUT_NAMES if other not in layouts]
        for layout in layouts:
            print(measure(args.bundle, args.device, precision, layout, batches, args.seconds),
                  flush=True)


if __name__ == "__main__":
    main()
