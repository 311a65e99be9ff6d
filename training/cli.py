"""``python -m training <command>``: the offline package's command line.

Commands:

* ``train --config FILE [section.key=value ...] [--restart]``: train or resume a run.
* ``build --config FILE [overrides]``: train (or resume), then ``export``.
* ``export --config FILE [overrides]``: from a finished run, select the FeatureNorm block,
  calibrate thresholds, evaluate and write the bundle (:mod:`training.pipeline`).
* ``average WEIGHTS WEIGHTS ... --out FILE``: the uniform mean of weights files of one
  network (:func:`training.weight_interpolation.average_states`), written as safetensors.
* ``ablate --config FILE [overrides] [--modes ...] [--out DIR]``: one run per loss mode from
  the same start and step budget, each measured like ``export`` measures, in one table
  (:mod:`training.ablation`).
* ``evaluate --bundle DIR | --config FILE [--weights FILE]  [--id SOURCE] --ood NAME=SOURCE
  ... [--out DIR]``: ID accuracy and OOD metrics (FPR95, AUROC, AUPR-In/Out, ID positive) of
  MSP, MaxLogit, energy and FeatureNorm (selected and last block), as a Markdown table, and
  with ``--out`` also ``report.json`` and SVG plots. With ``--bundle`` also the served
  operating point: the share of ID images accepted and of each OOD set rejected at the
  bundle's calibrated thresholds, per detector and per decision rule.
* ``sign BUNDLE --key PRIVATE.pem``: check the bundle, then write ``manifest.json.sig``, an
  Ed25519 signature of its manifest (:mod:`training.signing`), which the service requires
  when ``OODSERVE_BUNDLE_PUBLIC_KEY`` is set. An encrypted key's passphrase is asked for on
  the terminal.

Expected problems (bad config, missing data, unreadable image, wrong checkpoint) end with
``error: <message>`` and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import ConfigError, load_config


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


def cmd_export(args: argparse.Namespace) -> int:
    from training.pipeline import command_line, export_run

    cfg = load_config(args.config, args.overrides)
    out = export_run(cfg, command_line(["build", "--config", args.config, *args.overrides]))
    print(f"bundle: {out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from training.trainer import train

    train(load_config(args.config, args.overrides), restart=args.restart)
    return cmd_export(args)


def cmd_average(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from training.models.registry import read_state_dict
    from training.weight_interpolation import average_states

    if len(args.weights) < 2:
        raise ConfigError("give at least two weights files to average")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the average is written as safetensors; "
                          "name it *.safetensors")
    soup = average_states([read_state_dict(w) for w in args.weights])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in soup.items()}, str(out))
    print(f"mean of {len(args.weights)} weight sets: {out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from training.ablation import MODES, ablate

    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    ablate(args.config, args.overrides, args.modes, Path(args.out))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from training.data.sources import open_dataset, open_unlabelled
    from training.report import (
        evaluate_model,
        figures,
        markdown,
        operating_point,
        operating_point_markdown,
    )
    from training.runtime import select_device

    if bool(args.bundle) == bool(args.config):
        raise ConfigError("give either --bundle DIR or --config FILE")
    ood_sources = _parse_named(args.ood)
    if not ood_sources:
        raise ConfigError("give at least one --ood NAME=SOURCE")
    device = select_device(args.device)
    kw: dict = {}
    if args.bundle:
        from training.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        m = bundle.manifest
        model, pre, cache, name = bundle.model, m.preprocessing, None, m.name
        id_source = args.id or m.evaluation.get("id_test")
        kw = {"selected_block": m.featurenorm.selected_block, "ratios": m.featurenorm.norm_ratios}
        classes = m.classes
    else:
        from training.data.sampling import stratified_split
        from training.models import build_model, load_weights
        from training.pipeline import selection_indices

        cfg = load_config(args.config, args.overrides)
        pre, cache = cfg.data.preprocessing, cfg.data.cache_dir
        weights = Path(args.weights or Path(cfg.run_dir) / "model.safetensors")
        name, id_source = str(weights), args.id
        train_set = open_dataset(cfg.data.train, labeled=True, transform=pre.eval_transform(),
                                 cache_dir=cache)
        classes = list(train_set.classes)
        model = build_model(cfg.model.name, **{"num_classes": len(classes), **cfg.model.options})
        load_weights(model, weights)
        train_idx, _ = stratified_split(train_set.targets, cfg.data.val_fraction, cfg.seed)
        kw = {"selection_set": Subset(train_set, selection_indices(cfg, train_idx)),
              "seed": cfg.seed}
    if not id_source:
        raise ConfigError("give the labelled ID test set with --id SOURCE")
    tf = pre.eval_transform()
    id_set = open_dataset(id_source, labeled=True, transform=tf, cache_dir=cache)
    if list(id_set.classes) != list(classes):
        raise ConfigError(f"{id_source} has classes {list(id_set.classes)}, the model {classes}")
    ood_sets = open_unlabelled(ood_sources, pre, cache)
    result = evaluate_model(name, model.to(device).eval(), id_test=id_set, ood_sets=ood_sets,
                            device=device, batch_size=args.batch_size, **kw)
    report = {"model": name, "id": id_source, **result.to_json()}
    md = markdown([result], f"Evaluation of {name}",
                  [f"ID: `{id_source}`; OOD: " + ", ".join(f"{n} `{s}`" for n, s in
                                                           ood_sources.items())])
    if args.bundle:
        # What the service does with these images at the bundle's calibrated thresholds.
        op = operating_point(result, {d: c.threshold for d, c in m.calibration.items()},
                             m.default_decision)
        report["operating_point"] = op
        md += "\n" + operating_point_markdown(op, "Served operating point (the bundle's "
                                                   "calibrated thresholds)")
    if args.out:
        out = Path(args.out)
        (out / "plots").mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "report.md").write_text(md)
        for rel, text in figures(result, next(iter(ood_sets))).items():
            (out / rel).write_text(text)
    print(md)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    import getpass

    from training.signing import PassphraseNeeded, sign_bundle

    try:
        out = sign_bundle(Path(args.bundle), Path(args.key))
    except PassphraseNeeded:
        if not sys.stdin.isatty():
            raise ConfigError(f"{args.key}: the private key is encrypted; sign on a terminal "
                              "to enter its passphrase") from None
        passphrase = getpass.getpass(f"passphrase for {args.key}: ").encode()
        out = sign_bundle(Path(args.bundle), Path(args.key), passphrase)
    print(f"signed: {out}")
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

    for cmd, func, text in (("build", cmd_build, ("train, then select, evaluate, calibrate "
                             "and export a bundle")),
                            ("export", cmd_export, ("select, evaluate, calibrate and export a "
                             "bundle from a finished run"))):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--config", required=True, help="YAML file, e.g. configs/...yaml")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        if cmd == "build":
            p.add_argument("--restart", action="store_true", help="discard a checkpoint")
        p.set_defaults(func=func)

    p = sub.add_parser("average", help="the uniform mean of weights files of one network "
                       "(a model soup), e.g. as the next stage's model.pretrained")
    p.add_argument("weights", nargs="+", help="weights files (safetensors or torch)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("ablate", help="one run per loss mode from the same start and budget, "
                       "measured alike, in one table")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/...yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (every mode)")
    p.add_argument("--modes", nargs="+", default=["ce", "energy", "greg", "greg+"])
    p.add_argument("--out", default="runs/ablation", help="where ablation.md/.json go")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("evaluate", help="accuracy and OOD metrics of a bundle or weights")
    p.add_argument("--bundle", help="a bundle directory (its model, block and preprocessing)")
    p.add_argument("--config", help="or: a run's config (model, preprocessing, training images)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (with --config)")
    p.add_argument("--weights", help="with --config: weights; default RUN_DIR/model.safetensors")
    p.add_argument("--id", help="labelled ID test source (default: the bundle's test set)")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=SOURCE",
                   help="an OOD test set: folder, archive or synthetic:KIND (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", help="directory for report.json, report.md and plots/")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sign", help="sign a bundle's manifest (Ed25519) for a service that "
                       "requires signed bundles")
    p.add_argument("bundle", help="the bundle directory")
    p.add_argument("--key", required=True,
                   help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519)")
    p.set_defaults(func=cmd_sign)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, BundleError too
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
