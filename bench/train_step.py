"""Milliseconds per training step for ce, energy, greg and greg+ in one run, same model and batch.

    python bench/train_step.py [--config configs/cifar10_resnet20_gregplus.yaml] [--steps 10]

Each mode runs the real :meth:`training.trainer.Trainer.train_step` (sampling, loss, backward,
optimiser) on the same ID batch (batch_size images) and the same outlier batch
(2 x batch_size; greg+ picks them from a pool of sampler.pool_size candidates). Prints
ms/step (median of --steps after 2 warm-up steps), trained images/s, the ratio to ``energy``
and the share the sampler adds to a ``greg`` step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from training.config import load_config
from training.trainer import Trainer, prepare


def time_mode(config: str, mode: str, steps: int, overrides: list[str]) -> tuple[float, int]:
    cfg = load_config(config, [f"loss.mode={mode}", "run_dir=/tmp/oodserve-bench",
                               "data.num_workers=0", *overrides])
    trainer = Trainer(prepare(cfg))
    id_batch, aux_batch = next(trainer.batches())
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        stats = trainer.train_step(id_batch, aux_batch)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), stats["images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10_resnet20_gregplus.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")
    results = {m: time_mode(args.config, m, args.steps, args.overrides)
               for m in ("ce", "energy", "greg", "greg+")}
    base = results["energy"][0]
    print(f"{'mode':8} {'ms/step':>9} {'img/s':>8} {'x energy':>9}")
    for mode, (seconds, images) in results.items():
        print(f"{mode:8} {seconds * 1e3:9.1f} {images / seconds:8.1f} {seconds / base:9.2f}")
    extra = results["greg+"][0] / results["greg"][0] - 1
    print(f"sampler adds {extra * 100:.1f}% to a greg step")


if __name__ == "__main__":
    main()
