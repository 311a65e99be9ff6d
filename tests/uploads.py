"""Images for the tests to upload, made and encoded in memory."""

import io

import numpy as np
from PIL import Image


def noise_image(seed: int, size=(32, 32), mode: str = "RGB") -> Image.Image:
    """A random but smooth-ish image: different seeds give clearly different scores."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def noise_png(seed: int, size=(32, 32), mode: str = "RGB") -> bytes:
    """`noise_image` as PNG bytes: what most tests upload."""
    return png(noise_image(seed, size, mode))
