"""``python -m training ablate``: what each part of GReg+ buys, from one start and one budget.

The seed paper's claim is a ladder: cross-entropy alone < energy fine-tuning (Liu et al.
2020) < + the gradient penalty (GReg) < + the outlier sampler (GReg+). This command trains
one run per ``loss.mode`` from the same config (same start ``model.pretrained``, optimiser,
steps, seed and outliers), changing nothing but the mode, then measures every run with the
same evaluation as ``export`` (:func:`training.report.evaluate_model`) on the config's test
sets plus the auxiliary outliers no run trained on (``aux-val``), and writes one table.

The run of the config's own mode is the config's ``run_dir`` itself, so the ablation of a
bundle's config reuses (or produces) the bundle's training run; the other modes go to
``RUN_DIR-<mode>``. Steps and training time are the sums of the epochs' ``steps`` and
``seconds`` in each run's ``metrics.jsonl``: a run resumed after a kill counts only the steps
of its last call. Each run is measured on its own weights: an ``export`` of the same config
may then mix them with the start (``export.interpolation``), so its bundle's figures differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from training.config import RunConfig, load_config
from training.data.sampling import stratified_split
from training.data.sources import open_dataset, open_unlabelled
from training.detectors import SERVED
from training.models import build_model, load_weights
from training.pipeline import aux_validation_set, selection_indices
from training.report import ModelResult, evaluate_model
from training.runtime import select_device

MODES = ("ce", "energy", "greg", "greg+")


def run_dir_for(cfg: RunConfig, mode: str) -> str:
    return cfg.run_dir if mode == cfg.loss.mode else f"{cfg.run_dir}-{mode.replace('+', 'plus')}"


def _training_log(run_dir: Path) -> tuple[int, float]:
    """(steps, seconds) summed over the epochs in ``metrics.jsonl``."""
    records = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return (sum(r.get("steps", 0) for r in records),
            float(sum(r.get("seconds", 0.0) for r in records)))


def measure(cfg: RunConfig, weights: Path, run: dict) -> ModelResult:
    """One run's weights on the test sets and the unseen auxiliary outliers."""
    pre, ev, cache = cfg.data.preprocessing, cfg.evaluation, cfg.data.cache_dir
    tf = pre.eval_transform()
    full = open_dataset(cfg.data.train, labeled=True, transform=tf, cache_dir=cache)
    train_idx, _ = stratified_split(full.targets, cfg.data.val_fraction, cfg.seed)
    ood = open_unlabelled(ev.ood, pre, cache)
    if (held := aux_validation_set(cfg, run)) is not None:
        ood["aux-val"] = held
    device = select_device(cfg.train.device)
    model = build_model(cfg.model.name, num_classes=len(run["classes"]), **cfg.model.options)
    load_weights(model, weights)
    return evaluate_model(
        run["config"]["loss"]["mode"], model.to(device).eval(),
        id_test=open_dataset(ev.id_test, labeled=True, transform=tf, cache_dir=cache),
        ood_sets=ood, device=device, seed=cfg.seed,
        selection_set=Subset(full, selection_indices(cfg, train_idx)),
        batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers)


def table(rows: list[dict], detector: str) -> list[str]:
    sets = list(rows[0]["ood"])
    lines = ["| mode | steps | train s | test acc. % | " + " | ".join(sets) + " | mean |",
             "|---|---:|---:|---:|" + "---:|" * (len(sets) + 1)]
    for r in rows:
        cells = [r["ood"][s][detector] for s in sets]
        mean_f = np.mean([c["fpr95"] for c in cells])
        mean_a = np.mean([c["auroc"] for c in cells])
        lines.append(f"| {r['mode']} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{100 * r['id_accuracy']:.2f} | "
                     + " | ".join(f"{100 * c['fpr95']:.2f} / {100 * c['auroc']:.2f}"
                                  for c in cells)
                     + f" | {100 * mean_f:.2f} / {100 * mean_a:.2f} |")
    return lines


def ablate(config: str, overrides: list[str], modes: list[str], out: Path) -> Path:
    from training.trainer import train

    rows = []
    for mode in modes:
        base = load_config(config, overrides)
        cfg = load_config(config, [*overrides, f"loss.mode={mode}",
                                   f"run_dir={run_dir_for(base, mode)}"])
        run_dir = train(cfg)
        run = json.loads((run_dir / "run.json").read_text())
        result = measure(cfg, run_dir / "model.safetensors", run)
        steps, seconds = _training_log(run_dir)
        rows.append({"mode": mode, "run_dir": str(run_dir), "steps": steps,
                     "train_seconds": seconds,
                     "id_accuracy": result.id_accuracy, "selected_block": result.selected_block,
                     "ood": result.ood})
    rows.sort(key=lambda r: MODES.index(r["mode"]))
    cfg = load_config(config, overrides)
    md = [f"# Ablation of `{config}`" + (f" with `{' '.join(overrides)}`" if overrides else ""),
          "", (f"Start: `{cfg.model.pretrained}`; each mode trained with the same optimiser, "
          f"steps, seed and outliers; ID test `{cfg.evaluation.id_test}`; `aux-val`: the "
          "auxiliary outliers no run trained on. Cells: FPR95 / AUROC %, ID positive."), ""]
    for d in SERVED:
        where = " (each run's selected block)" if d.block == "selected" else ""
        md += [f"## {d.title}{where}", "", *table(rows, d.name), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "ablation.md").write_text("\n".join(md))
    print("\n".join(md))
    return out
