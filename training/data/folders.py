"""Image folders: labelled (one subfolder per class) and unlabelled (outliers, OOD sets).

Both check their files before any training time is spent: an empty folder, a folder without
class subfolders, or a file that does not decode as an image stops the run with a message
naming the folder or file. Decoding every image takes seconds for CIFAR-sized sets, so a
successful check is remembered in the cache under a key of the file list, sizes and
modification times; a changed folder is checked again.

Images are always decoded to 3-channel RGB (grayscale, palette, RGBA, CMYK and 16-bit images
included) by :func:`load_rgb`, the one decoder training, evaluation and the service share.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from training.data.archives import default_cache_dir
from training.progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_rgb(image: Image.Image) -> Image.Image:
    """An opened image as RGB: EXIF orientation applied, first frame, alpha over white.

    Modes Pillow cannot convert directly in one step are handled explicitly: 16-bit
    grayscale ('I;16*') is scaled down to 8 bits rather than clipped, and transparent
    images are composited on white instead of having their hidden colour revealed.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    with Image.open(path) as image:
        return load_rgb(image)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def verify_images(paths: Sequence[Path], cache_dir: str | Path | None = None) -> None:
    """Decode every image once; raise ``ValueError`` naming the first unreadable file."""
    digest = hashlib.sha256()
    for p in paths:
        st = p.stat()
        digest.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    stamp = Path(cache_dir or default_cache_dir()) / "verified" / digest.hexdigest()[:24]
    if stamp.exists():
        return

    def check(path: Path) -> str | None:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
            return f"{path}: {type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        for problem in progress(pool.map(check, paths, chunksize=256),
                                f"checking {len(paths)} images once", len(paths), "image"):
            if problem:
                raise ValueError(f"unreadable image {problem}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"images": len(paths)}))


class _ImageFolder(Dataset):
    """Shared part of both folders: ``samples`` of ``(path, label)``, checked, then served."""

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 cache_dir: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.samples: list[tuple[Path, int]] = self.find_samples()
        verify_images([p for p, _ in self.samples], cache_dir)
        self.transform = transform

    def find_samples(self) -> list[tuple[Path, int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform else image), label


class LabeledImageFolder(_ImageFolder):
    """``root/<class>/**/<image>``; classes in sorted folder order (torchvision's convention)."""

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 cache_dir: str | Path | None = None):
        super().__init__(root, transform, cache_dir)
        self.targets = [label for _, label in self.samples]

    def find_samples(self) -> list[tuple[Path, int]]:
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"dataset folder {self.root} has no class subfolders")
        samples = []
        for label, name in enumerate(self.classes):
            files = list_images(self.root / name)
            if not files:
                raise ValueError(f"class folder {self.root / name} holds no images")
            samples += [(f, label) for f in files]
        return samples


class UnlabeledImageFolder(_ImageFolder):
    """Every image under ``root`` at any depth, with label -1 (outliers, OOD test sets)."""

    def find_samples(self) -> list[tuple[Path, int]]:
        files = list_images(self.root)
        if not files:
            raise ValueError(f"dataset folder {self.root} holds no images")
        return [(f, -1) for f in files]
