"""Uploaded bytes -> the model's input tensor, exactly as training's evaluation does it.

Decoding uses :func:`training.data.folders.load_rgb` (EXIF orientation, first frame, 16-bit,
palette, alpha over white, CMYK) and the bundle's ``eval_transform``; it runs in a thread
pool so that a large image never blocks the event loop. The pixel limit is checked on the
header, before any pixel is decoded, so a decompression bomb costs nothing; Pillow's own
``DecompressionBombError`` is caught as a second line of defence.

Per-request budget: every image's decoded pixels are reserved from its request's
:class:`PixelBudget` (``OODSERVE_MAX_REQUEST_PIXELS``) on the header, before its pixels are
decoded; the image that would pass the budget fails the whole request with 413
``request_too_many_pixels``. So a request of many large images that each pass the per-image
limit (64 all-zero 5000x5000 PNGs in 4.7 MB: 27 s of decoding) costs at most the budget.
A request of several images is checked against the budget as a whole first, on their
headers (:meth:`Decoder.pixels`), before it is admitted: one that would pass it is refused
without decoding any image, rather than after its first large ones.

Reduced JPEG decoding (:data:`DRAFT_FACTOR`): a JPEG whose shorter side is at least
``2 * DRAFT_FACTOR * resize_size`` is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (Pillow's
``Image.draft``), the largest reduction that keeps the shorter side at least
``DRAFT_FACTOR * resize_size`` (512 pixels for CIFAR's 32): a 12 Mpx photo decodes as
0.75 Mpx, 16x fewer pixels. The DCT-domain reduction averages blocks of pixels much as the
antialiased resize that follows does, so the input is close to, not bit for bit, training's
preprocessing of the full image. Measured on the default model with 200 CIFAR-10 test images
upscaled to 2048x2048, 3000x2250 and 4000x3000 JPEGs (quality 92): predictions agreed for
200, 199 and 200; the largest change of a probability was 0.036, 0.075, 0.037, of the energy
0.19, 0.26, 0.16 (medians 0.02-0.05) -- the size of the change that re-encoding the same
image at quality 90 instead of 92 makes (0.034, 0.19). With a factor of 8 the changes were
about twice that. Images below that size, everything training and its evaluation see
(CIFAR's 32x32 included), are decoded in full and give training's numbers exactly.
"""

from __future__ import annotations

import io
import threading

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


# A JPEG is decoded reduced only when its shorter side stays at least this many times the
# resize target (see the module's docstring).
DRAFT_FACTOR = 16


class PixelBudget:
    """The pixels one request may still decode (``OODSERVE_MAX_REQUEST_PIXELS``); shared by
    the decoding threads of its images."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> None:
        with self._lock:
            if self.used + pixels > self.limit:
                raise self.exceeded()
            self.used += pixels

    def exceeded(self) -> RequestTooLarge:
        return RequestTooLarge(413, "request_too_many_pixels", f"the request's images decode "
                               f"to more than {self.limit} pixels in all "
                               "(OODSERVE_MAX_REQUEST_PIXELS); send fewer or smaller images "
                               "per request")


class RequestTooLarge(ServiceError):
    """The request as a whole is refused (not one image of a batch)."""


class Decoder:
    """Bytes -> tensor for one bundle's preprocessing, with the service's pixel limits."""

    def __init__(self, preprocessing: Preprocessing, max_pixels: int):
        self.transform = preprocessing.eval_transform()
        self.resize_size = preprocessing.resize_size
        self.max_pixels = max_pixels
        self.draft_side = DRAFT_FACTOR * preprocessing.resize_size

    def _reduce(self, image: Image.Image) -> None:
        """Decode a JPEG that is far larger than the model needs at a reduced scale."""
        if image.format == "JPEG" and min(image.size) >= 2 * self.draft_side:
            image.draft(image.mode, (self.draft_side, self.draft_side))

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

    def pixels(self, data: bytes) -> int:
        """What decoding ``data`` would reserve from its request's budget, read from the
        header alone (no pixel is decoded); 0 for an image that decoding will reject
        anyway, which reserves nothing."""
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                self._check_size(*image.size)
                self._reduce(image)
                return image.size[0] * image.size[1]
        except Exception:  # noqa: BLE001 - decoding says why, image by image
            return 0

    def __call__(self, data: bytes, budget: PixelBudget | None = None) -> torch.Tensor:
        """Preprocessed image tensor, or :class:`ImageRejected`; with ``budget``, the
        pixels to decode are reserved from it first (:class:`RequestTooLarge` when they do
        not fit)."""
        if not data:
            raise ImageRejected(422, "empty_file", "the uploaded file is empty")
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                self._check_size(*image.size)
                self._reduce(image)
                if budget is not None:
                    budget.reserve(image.size[0] * image.size[1])
                rgb = load_rgb(image)
        except (ImageRejected, RequestTooLarge):
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
