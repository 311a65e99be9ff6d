"""``python -m training <command>``: the offline package's command line.

Commands:

* ``train --config FILE [section.key=value ...] [--restart]``: train or resume a run.
* ``evaluate --config FILE [--weights FILE] --id SOURCE --ood NAME=SOURCE ...``: ID accuracy
  and OOD detection metrics (FPR95, AUROC, AUPR-In/Out, ID positive) of MSP, MaxLogit and
  energy for weights built as the config describes.

Expected problems (bad config, missing data, unreadable image, wrong checkpoint) end with
``error: <message>`` and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import ConfigError, load_config

DETECTORS = ("msp", "max_logit", "energy")


def _parse_named(items: list[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"--ood {item!r} is not of the form NAME=SOURCE")
        named[name] = source
    return named


def cmd_train(args: argparse.Namespace) -> int:
    from training.trainer import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, restart=args.restart)
    print(f"finished: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from training.data.sources import open_dataset
    from training.evaluation import score_dataset
    from training.metrics import ood_metrics
    from training.models import build_model, load_weights
    from training.runtime import select_device
    from training.scores import HIGHER_IS_ID

    cfg = load_config(args.config, args.overrides)
    ood_sources = _parse_named(args.ood)
    weights = Path(args.weights or Path(cfg.run_dir) / "model.safetensors")
    tf = cfg.data.preprocessing.eval_transform()
    size = cfg.data.preprocessing.input_size
    id_set = open_dataset(args.id, labeled=True, transform=tf, cache_dir=cfg.data.cache_dir)
    ood_sets = {name: open_dataset(src, labeled=False, transform=tf, image_size=size,
                                   cache_dir=cfg.data.cache_dir)
                for name, src in ood_sources.items()}
    model = build_model(cfg.model.name, num_classes=len(id_set.classes), **cfg.model.options)
    load_weights(model, weights)
    device = select_device(cfg.train.device)
    model.to(device)
    torch.set_grad_enabled(False)
    kw = dict(batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers)
    id_scores = score_dataset(model, id_set, device, **kw)
    report = {"weights": str(weights), "id": args.id,
              "id_accuracy": float((id_scores["pred"] == id_scores["label"]).mean()),
              "ood": {}}
    for name, dataset in ood_sets.items():
        ood_scores = score_dataset(model, dataset, device, **kw)
        report["ood"][name] = {
            det: ood_metrics(id_scores[det], ood_scores[det], HIGHER_IS_ID[det])
            for det in DETECTORS
        }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or resume a run from a config")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/...yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy and OOD metrics of trained weights")
    p.add_argument("--config", required=True, help="the run's config (model, preprocessing)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--weights", help="weights file; default RUN_DIR/model.safetensors")
    p.add_argument("--id", required=True, help="labelled ID test source")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=SOURCE",
                   help="an OOD test set (repeatable)")
    p.add_argument("--out", help="also write the JSON report here")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
