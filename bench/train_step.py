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


def _median_seconds(fn, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_mode(config: str, mode: str, steps: int, overrides: list[str]) -> tuple[float, int, float]:
    """(seconds per train_step, images per step, seconds per sampler call or 0)."""
    cfg = load_config(config, [f"loss.mode={mode}", "run_dir=/tmp/oodserve-bench",
                               "data.num_workers=0", *overrides])
    trainer = Trainer(prepare(cfg))
    id_batch, aux_batch = next(trainer.batches())
    stats = trainer.train_step(id_batch, aux_batch)
    step = _median_seconds(lambda: trainer.train_step(id_batch, aux_batch), steps)
    select = 0.0
    if trainer.sampler is not None:
        gen = torch.Generator().manual_seed(0)
        select = _median_seconds(
            lambda: trainer.sampler.select(trainer.model, aux_batch[0], gen), steps)
    return step, stats["images"], select


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
    for mode, (seconds, images, _) in results.items():
        print(f"{mode:8} {seconds * 1e3:9.1f} {images / seconds:8.1f} {seconds / base:9.2f}")
    greg, gregp, select = results["greg"][0], results["greg+"][0], results["greg+"][2]
    # Two readings: the sampler's own cost (scoring the pool, k-means, picks) over a greg
    # step, and the whole greg+ step over a greg step, which also includes the loss on the
    # outliers the sampler picked (a different set, with a different share on the correct
    # side of the margins, hence a different gradient-term cost).
    print(f"sampler call: {select * 1e3:.1f} ms = {select / greg * 100:.1f}% of a greg step")
    print(f"greg+ step vs greg step: +{(gregp / greg - 1) * 100:.1f}%")


if __name__ == "__main__":
    main()
