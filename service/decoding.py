"""Uploaded bytes -> the model's input tensor, exactly as training's evaluation does it.

Decoding uses :func:`training.data.folders.load_rgb` (EXIF orientation, first frame, 16-bit,
palette, alpha over white, CMYK) and the bundle's ``eval_transform``; it runs in a thread
pool so that a large image never blocks the event loop. The pixel limit is checked on the
header, before any pixel is decoded, so a decompression bomb costs nothing; Pillow's own
``DecompressionBombError`` is caught as a second line of defence.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError

from service.errors import ServiceError
from training.data.folders import load_rgb
from training.data.transforms import Preprocessing

# The formats the API promises. Refusing the rest keeps Pillow's rarer decoders (and their
# bugs) out of reach of uploads.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


class ImageRejected(ServiceError):
    """An upload that cannot be scored; ``code`` is the reason counted in the metrics."""


class Decoder:
    """Bytes -> tensor for one bundle's preprocessing, with the service's pixel limit."""

    def __init__(self, preprocessing: Preprocessing, max_pixels: int):
        self.transform = preprocessing.eval_transform()
        self.resize_size = preprocessing.resize_size
        self.max_pixels = max_pixels

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise ImageRejected(413, "too_many_pixels", f"image is {width}x{height} = "
                                f"{width * height} pixels; the limit is {self.max_pixels} "
                                "(OODSERVE_MAX_IMAGE_PIXELS)")
        # The shorter side is resized to resize_size: a thin sliver would be blown up.
        scale = self.resize_size / min(width, height)
        if width * height * scale * scale > self.max_pixels:
            raise ImageRejected(413, "too_many_pixels", f"image is {width}x{height}; "
                                f"resizing its shorter side to {self.resize_size} would make "
                                f"more than {self.max_pixels} pixels")

    def __call__(self, data: bytes) -> torch.Tensor:
        """Preprocessed image tensor, or :class:`ImageRejected`."""
        if not data:
            raise ImageRejected(422, "empty_file", "the uploaded file is empty")
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                self._check_size(*image.size)
                rgb = load_rgb(image)
        except ImageRejected:
            raise
        except Image.DecompressionBombError:
            # Pillow's own check, in Image.open, for sizes far over its default limit: it
            # comes before ours could look at the header.
            raise ImageRejected(413, "too_many_pixels", "image is far over the limit of "
                                f"{self.max_pixels} pixels (OODSERVE_MAX_IMAGE_PIXELS); "
                                "refused before decoding as a possible decompression "
                                "bomb") from None
        except UnidentifiedImageError:
            raise ImageRejected(415, "not_an_image", "not a recognised image; send JPEG, "
                                "PNG, WebP, BMP or GIF") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
            raise ImageRejected(422, "corrupt_image", "the image cannot be decoded, it is "
                                f"truncated or damaged ({type(exc).__name__}: {exc})") from None
        return self.transform(rgb)
