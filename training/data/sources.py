"""Name a dataset with one string, in configs and on the command line alike.

=====================================  ==================================================
source                                 dataset
=====================================  ==================================================
``DIR`` or ``DIR#sub/dir``             an image folder (labelled: one subfolder per class)
``FILE.tar.gz`` or ``FILE.tar.gz#sub``  the same, inside an archive extracted once to cache
``cifar10:ROOT[:train|test]``          torchvision's CIFAR-10 files already under ROOT
``cifar100:ROOT[:train|test]``         torchvision's CIFAR-100 files already under ROOT
``svhn:ROOT[:train|test|extra]``       torchvision's SVHN files already under ROOT
``synthetic:KIND[:N[:SEED]]``          generated noise: gaussian, uniform, rademacher, blobs
=====================================  ==================================================

torchvision datasets are opened with ``download=False``: nothing is fetched at run time, and
a missing dataset is reported with the root that was searched.
"""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch.utils.data import Dataset

from training.data.archives import extract_archive, is_archive
from training.data.folders import LabeledImageFolder, UnlabeledImageFolder
from training.data.synthetic import SyntheticOOD
from training.data.transforms import Preprocessing

_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}


class _Unlabeled(Dataset):
    """A labelled dataset used as outliers: same images, label -1."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base[index][0], -1


def _torchvision_dataset(kind: str, args: list[str], transform) -> Dataset:
    if not args or not args[0]:
        raise ValueError(f"{kind} source needs a root: '{kind}:ROOT[:SPLIT]'")
    root, split = args[0], (args[1] if len(args) > 1 else "train")
    cls = getattr(torchvision.datasets, _TORCHVISION[kind])
    try:
        if kind == "svhn":
            dataset = cls(root, split=split, transform=transform, download=False)
            dataset.classes = [str(i) for i in range(10)]
        else:
            if split not in ("train", "test"):
                raise ValueError(f"{kind} split must be train or test, got {split!r}")
            dataset = cls(root, train=split == "train", transform=transform, download=False)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(f"{kind} ({split}) not found under {root}: {exc}") from exc
    return dataset


def open_dataset(
    source: str, *, labeled: bool, transform=None, cache_dir=None, image_size: int = 32
) -> Dataset:
    """Open ``source`` (see the module table). Unlabelled datasets yield label -1.

    ``image_size`` is the side of generated synthetic images (the model's input size).
    """
    kind, _, rest = source.partition(":")
    if kind in _TORCHVISION and rest:
        dataset = _torchvision_dataset(kind, rest.split(":"), transform)
        return dataset if labeled else _Unlabeled(dataset)
    if kind == "synthetic" and rest:
        if labeled:
            raise ValueError(f"{source}: synthetic noise has no class labels")
        parts = rest.split(":")
        try:
            count = int(parts[1]) if len(parts) > 1 else 10_000
            seed = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise ValueError(
                f"{source}: expected synthetic:KIND[:N[:SEED]] with integers") from None
        return _TransformAfter(SyntheticOOD(parts[0], count, image_size, seed), transform)
    path_part, _, sub = source.partition("#")
    path = Path(path_part).expanduser()
    root = extract_archive(path, cache_dir) if is_archive(path) else path
    root = root / sub if sub else root
    folder = LabeledImageFolder if labeled else UnlabeledImageFolder
    return folder(root, transform=transform, cache_dir=cache_dir)


class _TransformAfter(Dataset):
    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return (self.transform(image) if self.transform else image), label


def open_unlabelled(sources: dict[str, str], preprocessing: Preprocessing,
                    cache_dir=None) -> dict[str, Dataset]:
    """``name -> source`` opened as unlabelled sets preprocessed for evaluation: the OOD test
    and validation sets, synthetic ones generated at the model's input size."""
    return {name: open_dataset(source, labeled=False, transform=preprocessing.eval_transform(),
                               image_size=preprocessing.input_size, cache_dir=cache_dir)
            for name, source in sources.items()}
