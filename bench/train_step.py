"""Milliseconds per training step for ce, energy, greg and greg+ in one run, same model and batch.

    python bench/train_step.py [--config configs/cifar10_resnet20_gregplus.yaml] [--steps 10]

Each mode runs the real :meth:`training.trainer.Trainer.train_step` (sampling, loss, backward,
optimiser) on the same ID batch (batch_size images) and the same outlier batch
(2 x batch_size; greg+ picks them from a pool of sampler.pool_size candidates). Prints
ms/step (median of --steps after 2 warm-up steps), trained images/s, the ratio to ``energy``
and the share the sampler adds to a ``greg`` step. The device is the config's train.device
(``train.device=cuda`` to choose it).

The default config fine-tunes from a stage-1 run's weights, which a fresh clone does not
have; the bench then starts from the network's shipped checkpoint instead and says so (see
:func:`initialisation`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from training.config import load_config
from training.data.sampling import mix_seed
from training.trainer import SAMPLER_STREAM, Trainer, prepare


def _sync(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA kernels run asynchronously, so a clock
    read without this would time their launches, not their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, steps: int, device: torch.device) -> float:
    times = []
    for i in range(steps + 2):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def initialisation(config: str, overrides: list[str]) -> tuple[list[str], str]:
    """(overrides that set the starting weights, a line saying which weights they are).

    The configured ``model.pretrained`` when its file exists or when the command line names
    it (then a missing file fails as in training). Otherwise, as for the default config on a
    fresh clone (a stage-1 run's weights that only a training run writes), the same network's
    shipped checkpoint, which the configs name as the ``pretrained`` baseline. Step times
    depend on the weights' values only through the share of samples on the correct side of
    the margins, which the gradient term is taken on; that share differs between the two, and
    so do greg and greg+ step times (the README's figures are from the stage-1 weights).
    """
    cfg = load_config(config, overrides)
    configured = cfg.model.pretrained
    if configured is None:
        return [], "random (model.pretrained is null)"
    explicit = any(o.startswith("model.pretrained=") for o in overrides)
    shipped = cfg.evaluation.baselines.get("pretrained")
    if explicit or Path(configured).is_file() or not (shipped and Path(shipped).is_file()):
        return [], configured
    described = (f"{shipped}, the shipped checkpoint ({configured} not found; "
                 "model.pretrained=PATH chooses)")
    # JSON-quoted: the override value is parsed as YAML, and a path must stay a string.
    return [f"model.pretrained={json.dumps(shipped)}"], described


def time_sampler(trainer: Trainer, pool: torch.Tensor, steps: int) -> float:
    """Seconds per sampler call, made as :meth:`Trainer.train_step` makes it: the candidates
    on the trainer's device, a generator on that device seeded for the trainer's position,
    under the run's autocast. The pool is copied to the device once, before the timing: the
    copy is part of a step, not of the sampler's cost."""
    dev, rt = trainer.rt.device, trainer.rt
    pool = pool.to(dev, non_blocking=True)

    def select() -> None:
        gen = torch.Generator(dev).manual_seed(
            mix_seed(trainer.cfg.seed, SAMPLER_STREAM, trainer.epoch, trainer.step, rt.rank))
        with rt.autocast():
            trainer.sampler.select(trainer.model, pool, gen)

    return _median_seconds(select, steps, dev)


def time_mode(config: str, mode: str, steps: int, overrides: list[str]) -> tuple[float, int, float]:
    """(seconds per train_step, images per step, seconds per sampler call or 0)."""
    cfg = load_config(config, [f"loss.mode={mode}", "run_dir=/tmp/oodserve-bench",
                               "data.num_workers=0", *overrides])
    trainer = Trainer(prepare(cfg))
    # The batches as the training loop hands them over (on the host, pinned when training on
    # CUDA): train_step copies them to the device itself, and that copy is part of a step.
    id_batch, aux_batch = next(trainer.batches())
    stats = trainer.train_step(id_batch, aux_batch)
    step = _median_seconds(lambda: trainer.train_step(id_batch, aux_batch), steps,
                           trainer.rt.device)
    select = 0.0
    if trainer.sampler is not None:
        select = time_sampler(trainer, aux_batch[0], steps)
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
    init, described = initialisation(args.config, args.overrides)
    print(f"init: {described}")
    overrides = [*args.overrides, *init]
    results = {m: time_mode(args.config, m, args.steps, overrides)
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
    print(f"greg+ step vs greg step: {(gregp / greg - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
