"""The training run: data, model, loss, outlier sampling, checkpoints, logs, DDP.

Layout of a run directory::

    checkpoint.pt      full training state (weights, optimiser, scheduler, RNG, position)
    model.safetensors  final weights (what the bundle step exports)
    run.json           config, classes, preprocessing, held-out split, data provenance
    metrics.jsonl      one JSON object per epoch (TensorBoard events too, if installed)

Resume is exact: batches, augmentations and the sampler's k-means draws are pure functions of
(seed, epoch, step, rank) (see :mod:`training.data.sampling`), and the checkpoint stores the
position, so re-running the same command after a kill continues where the last checkpoint
left off and ends with the same weights as an uninterrupted run.

Everything that can fail on bad input (config, datasets, images, pretrained weights) is
checked in :func:`prepare` before the first step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from training.config import ConfigError, RunConfig
from training.data.archives import source_provenance
from training.data.sampling import (
    SeededItems,
    StepBatches,
    mix_seed,
    random_split,
    stratified_split,
)
from training.data.sources import open_dataset
from training.detectors import ENERGY
from training.evaluation import score_dataset
from training.losses import GRegLoss
from training.metrics import ood_metrics
from training.models import TappedClassifier, build_model, load_weights
from training.outlier_sampling import EnergyClusterSampler
from training.runtime import Runtime, init_runtime, shutdown

# Config keys (or sections, ending in ".") that may change between a run and its
# resumption: they do not alter the trajectory of the weights.
RESUMABLE_CHANGES = ("data.num_workers", "data.cache_dir", "train.checkpoint_every",
                     "train.eval_batch_size", "evaluation.", "export.")


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)
# Streams of the seed mixer, so that no two random sources share draws.
ID_STREAM, AUX_STREAM, SAMPLER_STREAM, PROBE_STREAM, AUX_VAL_STREAM = 1, 2, 3, 4, 5
AUX_PROBE_SIZE = 2000


@dataclass
class Prepared:
    cfg: RunConfig
    runtime: Runtime
    model: TappedClassifier
    train_set: Dataset
    val_set: Dataset | None
    aux_set: Dataset | None
    aux_probe: Dataset | None
    classes: list[str]
    train_indices: list[int]
    val_indices: list[int]
    aux_val_indices: list[int]
    steps_per_epoch: int


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def aux_split(num_outliers: int, cfg: RunConfig) -> tuple[list[int], list[int]]:
    """(training, validation) indices of the auxiliary outliers: ``data.aux_val_fraction`` of
    them, drawn with the run's seed, are never trained on, so model choices (interpolation,
    recipe) can be judged on outliers the model has not seen (:mod:`training.model_choice`)."""
    return random_split(num_outliers, cfg.data.aux_val_fraction,
                        mix_seed(cfg.seed, AUX_VAL_STREAM))


def prepare(cfg: RunConfig, runtime: Runtime | None = None) -> Prepared:
    """Open and check everything a run needs; raise before any training time is spent."""
    runtime = runtime or init_runtime(cfg.train.device, cfg.train.amp)
    pre = cfg.data.preprocessing
    train_tf = pre.train_transform(cfg.data.augment)
    full = open_dataset(cfg.data.train, labeled=True, transform=train_tf,
                        cache_dir=cfg.data.cache_dir)
    classes = list(full.classes)
    train_idx, val_idx = stratified_split(full.targets, cfg.data.val_fraction, cfg.seed)
    train_set = SeededItems(Subset(full, train_idx))
    val_set = None
    if val_idx:
        val_full = open_dataset(cfg.data.train, labeled=True, transform=pre.eval_transform(),
                                cache_dir=cfg.data.cache_dir)
        val_set = Subset(val_full, val_idx)

    aux_set = aux_probe = None
    aux_train_idx: list[int] = []
    aux_val_idx: list[int] = []
    if cfg.loss.mode != "ce":
        aux_train = open_dataset(cfg.data.aux, labeled=False, transform=train_tf,
                                 cache_dir=cfg.data.cache_dir)
        aux_train_idx, aux_val_idx = aux_split(len(aux_train), cfg)
        aux_set = SeededItems(Subset(aux_train, aux_train_idx))
        # The progress probe: outliers training never sees when there is a validation split
        # (an honest signal), otherwise a sample of the training outliers.
        aux_eval = open_dataset(cfg.data.aux, labeled=False, transform=pre.eval_transform(),
                                cache_dir=cfg.data.cache_dir)
        pool = aux_val_idx or aux_train_idx
        probe = torch.randperm(len(pool), generator=torch.Generator().manual_seed(
            mix_seed(cfg.seed, PROBE_STREAM)))[:AUX_PROBE_SIZE]
        aux_probe = Subset(aux_eval, [pool[i] for i in probe.tolist()])

    options = dict(cfg.model.options)
    if options.setdefault("num_classes", len(classes)) != len(classes):
        raise ConfigError(f"model.options.num_classes={options['num_classes']} but "
                          f"{cfg.data.train} has {len(classes)} classes")
    model = build_model(cfg.model.name, **options)
    if cfg.model.pretrained:
        load_weights(model, cfg.model.pretrained)

    per_step = cfg.train.batch_size * runtime.world
    steps = len(train_idx) // per_step
    if steps == 0:
        raise ConfigError(f"{len(train_idx)} training images are fewer than one step of "
                          f"{per_step} (train.batch_size x processes)")
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return Prepared(cfg, runtime, model.to(runtime.device), train_set, val_set, aux_set,
                    aux_probe, classes, train_idx, val_idx, aux_val_idx, steps)


def lr_factor(cfg: RunConfig, steps_per_epoch: int):
    total = cfg.train.epochs * steps_per_epoch
    o = cfg.optim

    def factor(step: int) -> float:
        if o.schedule == "cosine":
            cosine = 0.5 * (1 + math.cos(math.pi * step / total))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine
        if o.schedule == "multistep":
            epoch = step // steps_per_epoch
            return o.gamma ** sum(epoch >= m for m in o.milestones)
        return 1.0

    return factor


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)


class Trainer:
    """Owns the mutable state of a run and advances it step by step."""

    def __init__(self, prep: Prepared):
        self.p, self.cfg, self.rt = prep, prep.cfg, prep.runtime
        self.run_dir = Path(self.cfg.run_dir)
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = prep.model
        self.net: torch.nn.Module = self.model
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.cfg, prep.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.rt.device.type,
                                           enabled=self.rt.amp_dtype == torch.float16)
        lc = self.cfg.loss
        self.loss_fn = GRegLoss(lc.mode, lc.lambda_energy, lc.lambda_grad, lc.m_in, lc.m_out,
                                lc.grad_scaling, lc.grad_bn)
        self.sampler = None
        if lc.mode == "greg+":
            sc = self.cfg.sampler
            self.sampler = EnergyClusterSampler(
                self.cfg.outliers_per_step, sc.num_clusters or self.cfg.train.batch_size,
                sc.two_way, sc.kmeans_iters)
        self.epoch, self.step = 0, 0
        self.writer = None

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        if not self.rt.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.model_dump(mode="json"),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def try_resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.rt.device, weights_only=True)
        old, new = _flatten(state["config"]), _flatten(self.cfg.model_dump(mode="json"))
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and not _resumable(k))
        if self.cfg.loss.mode == "ce" and "data.aux_val_fraction" not in old:
            # a checkpoint from before the outlier split existed: a ce run never reads outliers
            changed = [k for k in changed if k != "data.aux_val_fraction"]
        if changed:
            raise ConfigError(
                f"{self.checkpoint_path} was written with another config "
                f"(differs in {', '.join(changed)}); use another run_dir or pass --restart")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        return True

    # ----------------------------------------------------------------- data
    def _loader(self, dataset: Dataset, per_rank: int, stream: int, wrap: bool) -> DataLoader:
        batches = StepBatches(len(dataset), per_rank, seed=self.cfg.seed, stream=stream,
                              epoch=self.epoch, start=self.step, end=self.p.steps_per_epoch,
                              rank=self.rt.rank, world=self.rt.world, wrap=wrap)
        workers = self.cfg.data.num_workers
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                          pin_memory=self.rt.device.type == "cuda",
                          persistent_workers=False, generator=torch.Generator(),
                          prefetch_factor=4 if workers else None)

    def batches(self):
        """This rank's (ID batch, outlier batch or None) pairs from the current position."""
        id_loader = self._loader(self.p.train_set, self.cfg.train.batch_size, ID_STREAM, False)
        if self.p.aux_set is None:
            for batch in id_loader:
                yield batch, None
            return
        per_step = (self.cfg.sampler.pool_size if self.sampler else self.cfg.outliers_per_step)
        aux_loader = self._loader(self.p.aux_set, per_step, AUX_STREAM, True)
        yield from zip(id_loader, aux_loader)

    # ----------------------------------------------------------------- steps
    def train_step(self, id_batch, aux_batch) -> dict[str, float]:
        dev = self.rt.device
        x_in = id_batch[0].to(dev, non_blocking=True)
        y_in = id_batch[1].to(dev, non_blocking=True)
        x_out = None
        if aux_batch is not None:
            x_out = aux_batch[0].to(dev, non_blocking=True)
            if self.sampler is not None:
                gen = torch.Generator(dev).manual_seed(
                    mix_seed(self.cfg.seed, SAMPLER_STREAM, self.epoch, self.step, self.rt.rank))
                with self.rt.autocast():
                    chosen = self.sampler.select(self.model, x_out, gen)
                x_out = x_out[chosen]
        self.net.train()
        with self.rt.autocast():
            terms = self.loss_fn(self.net, x_in, y_in, x_out, eval_model=self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # Only the terms the mode has: a plain classifier logs no energy terms (and no NaN
        # "correct side" shares, which JSON cannot carry).
        stats = {"loss": float(terms.total.detach()), "ce": float(terms.ce.detach())}
        mode = self.cfg.loss.mode
        if mode != "ce":
            stats.update(energy=float(terms.energy.detach()), in_ok=terms.correct_in,
                         out_ok=terms.correct_out)
        if mode in ("greg", "greg+"):
            stats["grad"] = float(terms.grad.detach())
        stats["images"] = x_in.shape[0] + (0 if x_out is None else x_out.shape[0])
        return stats

    def validate(self) -> dict[str, float]:
        """ID accuracy and energy on the held-out split; energy AUROC/FPR95 vs. a fixed
        probe of auxiliary images (training-distribution outliers: a progress signal, not a
        test result)."""
        out: dict[str, float] = {}
        bs, dev = self.cfg.train.eval_batch_size, self.rt.device
        if self.p.val_set is None:
            return out
        val = score_dataset(self.model, self.p.val_set, dev, batch_size=bs)
        out["val_accuracy"] = float((val.pred == val.label).mean())
        out["val_energy_mean"] = float(val.of(ENERGY).mean())
        if self.p.aux_probe is not None:
            aux = score_dataset(self.model, self.p.aux_probe, dev, batch_size=bs)
            m = ood_metrics(val.of(ENERGY), aux.of(ENERGY), ENERGY.higher_is_id)
            out.update(aux_energy_mean=float(aux.of(ENERGY).mean()),
                       aux_energy_auroc=m["auroc"], aux_energy_fpr95=m["fpr95"])
        return out

    def log_epoch(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                self.writer = False
            else:
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def run(self, stop_after_steps: int | None = None) -> None:
        """Train to the end (or until ``stop_after_steps`` steps of this call, for tests)."""
        cfg, spe = self.cfg, self.p.steps_per_epoch
        done_here = 0
        while self.epoch < cfg.train.epochs:
            sums: dict[str, float] = {}
            count, images, started = 0, 0, time.perf_counter()
            bar = tqdm(total=spe, initial=self.step,
                       desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                       disable=not self.rt.is_main, dynamic_ncols=True, unit="step")
            for id_batch, aux_batch in self.batches():
                stats = self.train_step(id_batch, aux_batch)
                self.step += 1
                done_here += 1
                count += 1
                images += stats.pop("images")
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                rate = images * self.rt.world / (time.perf_counter() - started)
                bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()}
                                | {"img/s": f"{rate:.0f}"})
                bar.update(1)
                last_of_epoch = self.step == spe
                if last_of_epoch:
                    self.epoch, self.step = self.epoch + 1, 0
                if last_of_epoch or self.step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint()
                if stop_after_steps is not None and done_here >= stop_after_steps:
                    bar.close()
                    return
            bar.close()
            if self.rt.is_main:
                record = {"epoch": self.epoch, "steps": count,
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "seconds": time.perf_counter() - started,
                          "images_per_s": images * self.rt.world / (time.perf_counter() - started),
                          **{f"train_{k}": v / max(count, 1) for k, v in sums.items()},
                          **self.validate()}
                self.log_epoch(record)
                tqdm.write(json.dumps(record))
            self.rt.barrier()

    def finish(self) -> None:
        """Write the final weights and the run description."""
        if not self.rt.is_main:
            return
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  str(self.run_dir / "model.safetensors"))
        cfg = self.cfg
        provenance = source_provenance({"train": cfg.data.train, "aux": cfg.data.aux,
                                        "pretrained": cfg.model.pretrained})
        description = {
            "config": cfg.model_dump(mode="json"),
            "classes": self.p.classes,
            "preprocessing": cfg.data.preprocessing.model_dump(mode="json"),
            "split": {"seed": cfg.seed, "val_fraction": cfg.data.val_fraction,
                      "train_count": len(self.p.train_indices), "val_indices": self.p.val_indices},
            "aux_split": {"seed": mix_seed(cfg.seed, AUX_VAL_STREAM),
                          "val_fraction": cfg.data.aux_val_fraction,
                          "val_indices": self.p.aux_val_indices},
            "provenance": provenance,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "device": str(self.rt.device), "processes": self.rt.world},
        }
        (self.run_dir / "run.json").write_text(json.dumps(description, indent=1))


def train(cfg: RunConfig, restart: bool = False) -> Path:
    """Run (or resume) training for ``cfg``; returns the run directory."""
    prep = prepare(cfg)
    trainer = Trainer(prep)
    try:
        run_dir = Path(cfg.run_dir)
        if trainer.rt.is_main and restart:
            for name in ("checkpoint.pt", "metrics.jsonl", "model.safetensors", "run.json"):
                (run_dir / name).unlink(missing_ok=True)
        trainer.rt.barrier()
        if trainer.try_resume() and trainer.rt.is_main:
            tqdm.write(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step}")
        trainer.run()
        trainer.finish()
    finally:
        shutdown(trainer.rt)
    return run_dir

