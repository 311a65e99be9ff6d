"""The model bundle: what training exports and the service loads.

A bundle is one directory::

    manifest.json       versioned description (the :class:`Manifest` schema below)
    model.safetensors   the weights; safetensors, so loading one never runs pickle
    NOTICE              licence notices of the weights' ancestry (optional)
    manifest.json.sig   Ed25519 signature of manifest.json (optional; training/signing.py)

The manifest holds everything needed to turn an image into calibrated decisions: the
architecture and its options, class names, preprocessing, the blocks to tap, the selected
FeatureNorm block with every block's NormRatio, one :class:`ScoreCalibration` per served
score (threshold at the calibration TPR plus the ID quantile table for other TPRs), the
evaluation results, the training config and data provenance, and the sha256 of the weights.

:func:`load_bundle` trusts nothing: it checks the format version, the schema, the weights'
checksum, that the weights fit the declared architecture, and that the declared blocks exist,
and raises :class:`BundleError` with a message that says which of these failed; given a public
key, it first checks the manifest's signature, which covers the weights through their sha256.
Both the service and ``python -m training evaluate --bundle`` load bundles through it, which
is what makes their scores identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from training.calibration import ScoreCalibration
from training.data.archives import file_sha256
from training.data.transforms import Preprocessing
from training.detectors import BY_NAME, SERVED_NAMES, DecisionRule
from training.models import TappedClassifier, build_model, load_state

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
NOTICE_FILE = "NOTICE"


class BundleError(ValueError):
    """A bundle that cannot be served, with what is wrong with it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Architecture(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="constructor options, num_classes included")


class FeatureNormBlock(_Strict):
    selected_block: str
    norm_ratios: dict[str, float] = Field(..., description="NormRatio of every tapped block")
    selection: dict[str, Any] = Field(default_factory=dict,
                                      description="how the ratios were measured")


class WeightsFile(_Strict):
    file: str = WEIGHTS_FILE
    format: Literal["safetensors"] = "safetensors"
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(..., min_length=1)
    version: str = Field(..., min_length=1)
    created: str = Field(..., description="UTC time of export, ISO 8601")
    architecture: Architecture
    classes: list[str] = Field(..., min_length=2)
    preprocessing: Preprocessing
    taps: list[str] = Field(..., min_length=1, description="blocks tapped at serving time")
    featurenorm: FeatureNormBlock
    calibration: dict[Literal[SERVED_NAMES], ScoreCalibration]  # one per served detector
    default_decision: DecisionRule = "any"
    evaluation: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsFile

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.featurenorm.selected_block not in self.taps:
            raise ValueError(f"featurenorm.selected_block {self.featurenorm.selected_block!r} "
                             f"is not among taps {self.taps}")
        missing = [s for s in SERVED_NAMES if s not in self.calibration]
        if missing:
            raise ValueError(f"calibration lacks {missing}")
        # The direction is the detector table's; a manifest saying otherwise would be served
        # with its decisions inverted.
        flipped = [name for name, cal in self.calibration.items()
                   if cal.higher_is_id != BY_NAME[name].higher_is_id]
        if flipped:
            raise ValueError(f"calibration of {flipped}: higher_is_id contradicts the "
                             "detector's direction (training/detectors.py)")
        if self.architecture.options.get("num_classes", len(self.classes)) != len(self.classes):
            raise ValueError("architecture.options.num_classes differs from len(classes)")
        return self


@dataclass
class Bundle:
    """A loaded, checked bundle: the model in eval mode on CPU and its manifest."""

    path: Path
    manifest: Manifest
    model: TappedClassifier


def _read_manifest(path: Path, public_key: Path | None = None) -> Manifest:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"{path}: no {MANIFEST_FILE}; is this a bundle directory?")
    data = file.read_bytes()  # the bytes checked are the bytes parsed
    if public_key is not None:
        from training.signing import verify_manifest

        try:
            verify_manifest(path, data, public_key)
        except ValueError as exc:  # no or a bad signature, or a key that cannot be used
            raise BundleError(f"{path}: {exc}") from None
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{file}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{file}: format_version {version!r} is not supported "
                          f"(this oodserve reads version {FORMAT_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                 for e in exc.errors()]
        raise BundleError(f"{file}: invalid manifest:\n" + "\n".join(lines)) from None


def load_bundle(path: str | Path, public_key: Path | None = None) -> Bundle:
    """Load and check the bundle in directory ``path``; raise :class:`BundleError` if bad.
    With ``public_key`` (an Ed25519 public key's PEM file), an unsigned bundle, or one whose
    signature does not verify with that key, is bad too."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    manifest = _read_manifest(path, public_key)
    weights = path / manifest.weights.file
    if weights.parent.resolve() != path.resolve():
        raise BundleError(f"weights.file {manifest.weights.file!r} must name a file inside "
                          "the bundle directory")
    if not weights.is_file():
        raise BundleError(f"{path}: weights file {manifest.weights.file} is missing")
    # Read once: the bytes hashed are the bytes loaded, so the file cannot be swapped
    # between the check and the load (which would defeat a signed manifest's hash).
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise BundleError(f"{weights}: unreadable ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.weights.sha256:
        raise BundleError(f"{weights}: sha256 {digest} does not match the manifest's "
                          f"{manifest.weights.sha256}; the file is corrupt or was replaced")
    try:
        state = load_safetensors(data)
    except SafetensorError as exc:
        raise BundleError(f"{weights}: unreadable safetensors file ({exc})") from None
    arch = manifest.architecture
    try:
        model = build_model(arch.name, **{"num_classes": len(manifest.classes), **arch.options})
        load_state(model, state, source=str(weights))
        model.check_blocks(manifest.taps)
        model.check_blocks(manifest.featurenorm.norm_ratios)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: {exc}") from None
    model.eval()
    return Bundle(path=path, manifest=manifest, model=model)


def export_bundle(out_dir: str | Path, model: TappedClassifier, manifest: dict[str, Any],
                  notice: str | None = None, files: dict[str, str] | None = None) -> Path:
    """Write ``model`` and ``manifest`` (all fields but ``weights`` and ``created``) to
    ``out_dir``, replacing a previous bundle there only once the new one is complete.

    ``files`` maps paths relative to the bundle (report, plots, README) to their text.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        fields = dict(manifest)
        fields["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        fields["weights"] = {"file": WEIGHTS_FILE, "sha256": file_sha256(staging / WEIGHTS_FILE)}
        checked = Manifest.model_validate(fields)
        (staging / MANIFEST_FILE).write_text(checked.model_dump_json(indent=1) + "\n")
        if notice:
            (staging / NOTICE_FILE).write_text(notice)
        for rel, text in (files or {}).items():
            target = (staging / rel).resolve()
            if staging.resolve() not in target.parents or rel in (MANIFEST_FILE, WEIGHTS_FILE):
                raise ValueError(f"bundle file name {rel!r} is not a new path inside the bundle")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        load_bundle(staging)  # never leave behind a bundle that the loader refuses
        # mkdtemp and save_file create owner-only modes; a bundle is meant to be read by other
        # users too (e.g. the service container's non-root user on a mounted volume).
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
