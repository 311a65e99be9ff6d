"""Run configuration: YAML files in ``configs/``, validated with pydantic, overridable per key.

Every section forbids unknown keys and checks ranges, so a typo (``loss.lambda_gard``) or an
impossible value (``optim.lr: -1``) stops the run before any data is read, with the dotted
path of the offending key. Any key can be overridden on the command line as
``section.key=value`` (the value is parsed as YAML: ``train.epochs=3``,
``optim.milestones=[50,55]``, ``model.pretrained=null``).

A file may start from another with ``base: other.yaml`` (a path relative to the file): the
base's sections are merged under the file's key by key, so the data, preprocessing and test
sets that every CIFAR-10 run shares are written once (``configs/base/``). A file can change
or add entries of an inherited mapping (``evaluation.ood``) but not drop them; a command-line
override of the mapping itself (``evaluation.ood={...}``) replaces it whole.

Relative paths inside a config are taken relative to the working directory (run from the
repository root).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.data.transforms import Preprocessing
from training.losses import LossMode


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = "resnet20"
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="constructor options other than num_classes")
    pretrained: str | None = Field(None, description="weights to fine-tune from (local file)")


class DataConfig(_Section):
    train: str = Field(..., description="labelled ID training source (see training.data.sources)")
    aux: str | None = Field(None, description="auxiliary outlier source (unlabelled)")
    aux_val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0,
        description="share of the auxiliary outliers training never sees: the validation "
                    "outliers every model choice is made on (training.model_choice)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                description="share of each class held out for calibration")
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    num_workers: int = Field(2, ge=0, le=64)
    cache_dir: str | None = Field(None, description="extraction cache; default ~/.cache/oodserve")


class LossConfig(_Section):
    mode: LossMode = "greg+"
    lambda_energy: float = Field(0.1, ge=0.0)
    lambda_grad: float = Field(1.0, ge=0.0)
    m_in: float = -25.0
    m_out: float = -7.0
    grad_scaling: Literal["paper", "reference"] = "paper"
    grad_bn: Literal["shared", "eval"] = "shared"

    @model_validator(mode="after")
    def _margins(self) -> LossConfig:
        if self.m_in >= self.m_out:
            raise ValueError(f"m_in ({self.m_in}) must be below m_out ({self.m_out}): "
                             "ID energies are pushed below m_in, outliers above m_out")
        return self


class SamplerConfig(_Section):
    """GReg+ only. ``pool_size`` candidates are scored per step; see outlier_sampling."""

    pool_size: int = Field(192, ge=1)
    num_clusters: int | None = Field(None, ge=1, description="default: the ID batch size")
    two_way: bool = True
    kmeans_iters: int = Field(10, ge=0, le=1000)


class OptimConfig(_Section):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    min_lr_ratio: float = Field(1e-3, ge=0.0, le=1.0, description="cosine floor, times lr")
    milestones: list[int] = Field(default_factory=list, description="multistep epochs")
    gamma: float = Field(0.1, gt=0.0, le=1.0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536, description="ID images per step per process")
    aux_batch_size: int | None = Field(None, ge=1,
                                       description="outliers per step; default 2 x batch_size")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap for quick runs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    eval_batch_size: int = Field(256, ge=1)


class EvaluationConfig(_Section):
    """What the bundle step measures: block selection, calibration and the test report."""

    id_test: str | None = Field(None, description="labelled ID test source for the report")
    ood: dict[str, str] = Field(default_factory=dict, description="name -> OOD test source")
    profile_ood: str | None = Field(
        None, description="OOD set (a key of ood) for the per-block AUROC plot; default first")
    baselines: dict[str, str] = Field(
        default_factory=dict, description="name -> weights file evaluated beside the result")
    tpr: float = Field(0.95, gt=0.0, le=1.0, description="ID TPR the thresholds keep")
    selection_images: int | None = Field(
        None, ge=1, description="cap on ID training images for NormRatio; default all")
    validation_ood: dict[str, str] = Field(
        default_factory=dict,
        description="name -> OOD source used, with the held-out auxiliary outliers, to choose "
                    "the weights (training.model_choice); never a test set")

    @model_validator(mode="after")
    def _profile(self) -> EvaluationConfig:
        if self.profile_ood is not None and self.profile_ood not in self.ood:
            raise ValueError(f"profile_ood {self.profile_ood!r} is not one of ood: "
                             f"{list(self.ood)}")
        return self


class ExportConfig(_Section):
    dir: str | None = Field(None, description="bundle directory; default RUN_DIR/bundle")
    name: str | None = Field(None, description="model name; default the run directory's name")
    version: str = "1.0.0"
    notice: str | None = Field(None, description="licence notice file copied into the bundle")
    interpolation: float | None = Field(
        None, ge=0.0, le=1.0,
        description="bundle weights = (1 - a) * model.pretrained + a * the run's weights "
                    "(WiSE-FT; training.weight_interpolation); null: the run's weights")
    interpolation_candidates: list[float] = Field(
        default_factory=list,
        description="values of export.interpolation to choose from on validation data "
                    "(training.model_choice); empty: no choice")
    max_accuracy_drop: float = Field(
        1.5, ge=0.0, le=100.0,
        description="held-out ID accuracy points a candidate may lose against model.pretrained")
    average_with: list[str] = Field(
        default_factory=list,
        description="weights of other runs of the same network, averaged uniformly with this "
                    "run's (a model soup) before export.interpolation; empty: this run's alone")


class RunConfig(_Section):
    run_dir: str
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.loss.mode != "ce" and not self.data.aux:
            raise ValueError(f"loss.mode {self.loss.mode!r} needs auxiliary outliers: set data.aux")
        if self.loss.mode == "greg+" and self.sampler.pool_size < self.outliers_per_step:
            raise ValueError(f"sampler.pool_size ({self.sampler.pool_size}) must be at least the "
                             f"{self.outliers_per_step} outliers picked per step")
        ex = self.export
        if (ex.interpolation is not None or ex.interpolation_candidates) \
                and not self.model.pretrained:
            raise ValueError("export.interpolation mixes the run's weights with "
                             "model.pretrained: set model.pretrained")
        if ex.interpolation is not None and ex.interpolation_candidates:
            raise ValueError("set export.interpolation or export.interpolation_candidates, "
                             "not both")
        if any(not 0.0 <= a <= 1.0 for a in ex.interpolation_candidates):
            raise ValueError("export.interpolation_candidates must lie in [0, 1]")
        if ex.interpolation_candidates and not (
                (self.data.aux and self.data.aux_val_fraction > 0)
                or self.evaluation.validation_ood):
            raise ValueError("export.interpolation_candidates are judged on validation "
                             "outliers: set data.aux_val_fraction > 0 or "
                             "evaluation.validation_ood")
        return self

    @property
    def outliers_per_step(self) -> int:
        return self.train.aux_batch_size or 2 * self.train.batch_size


class ConfigError(ValueError):
    """A configuration problem, with every offending key in the message."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` override applied."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(value)
    return raw


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else in ``top`` replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, with its ``base:`` file (relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: its base: chain loops back to itself")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another config file")
    return merge(read_config_file(path.parent / base, (*_chain, path.resolve())), loaded)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(Path(path))
    raw = apply_overrides(raw, list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"invalid config {path or ''}:\n" + "\n".join(lines)) from None
