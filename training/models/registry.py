"""Name -> constructor table, and loading of weights from local files.

Options are checked against each constructor's signature before anything is built, so a
typo in a config fails with the list of valid options instead of a ``TypeError`` deep inside.
Weights load from safetensors files or from ``torch.save`` files read with
``weights_only=True`` (tensors and plain containers only, never arbitrary pickled objects).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.models.base import TappedClassifier
from training.models.cifar_resnet import CifarResNet, CifarResNet18
from training.models.imagenet_resnet import ARCHS, TorchvisionResNet
from training.models.wide_resnet import WideResNet


def _resnet20(num_classes: int = 10) -> TappedClassifier:
    return CifarResNet(20, num_classes)


def _resnet56(num_classes: int = 10) -> TappedClassifier:
    return CifarResNet(56, num_classes)


def _resnet18_cifar(num_classes: int = 10) -> TappedClassifier:
    return CifarResNet18(num_classes)


def _wrn40_2(num_classes: int = 10, drop_rate: float = 0.0) -> TappedClassifier:
    return WideResNet(40, 2, num_classes, drop_rate)


def _torchvision(arch: str) -> Callable[..., TappedClassifier]:
    def build(num_classes: int = 1000) -> TappedClassifier:
        return TorchvisionResNet(arch, num_classes)

    return build


_REGISTRY: dict[str, Callable[..., TappedClassifier]] = {
    "resnet20": _resnet20,
    "resnet56": _resnet56,
    "resnet18_cifar": _resnet18_cifar,
    "wrn40_2": _wrn40_2,
    **{arch: _torchvision(arch) for arch in ARCHS},
}
MODEL_NAMES = tuple(_REGISTRY)


def build_model(name: str, **options) -> TappedClassifier:
    """Build the model called ``name``; ``options`` go to its constructor (e.g. num_classes)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    ctor = _REGISTRY[name]
    allowed = set(inspect.signature(ctor).parameters)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; its options are {sorted(allowed)}"
        )
    return ctor(**options)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, a raw state dict, or a checkpoint dict.

    Checkpoint dicts are recognised by a ``state_dict`` key (the layout of the pretrained
    CIFAR weights) or a ``model`` key (oodserve's own training checkpoints). A ``module.``
    prefix left by DataParallel/DDP is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable torch weights file ({exc})") from exc
        state = obj
        if isinstance(obj, dict) and "state_dict" in obj:
            state = obj["state_dict"]
        elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            state = obj["model"]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load the weights file ``path`` into ``model`` (see :func:`load_state`)."""
    load_state(model, read_state_dict(path), source=str(path))


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, failing with a message that names the mismatch.

    A checkpoint of another architecture (missing or extra parameters, or shapes that differ,
    e.g. another number of classes) is refused as a whole; nothing is partially loaded.
    ``source`` names the origin of ``state`` in that message.
    """
    state = dict(state)
    own = model.state_dict()
    # Weights saved before PyTorch 0.4.1 have no BatchNorm step counters; they are unused
    # with the default momentum, so the model's own (zero) counters stand in for them.
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})")
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: parameters "
            + "; ".join(parts)
            + ". Is it a checkpoint of another architecture or number of classes?"
        )
    model.load_state_dict(state)
