"""The bad-input corpus: hostile or odd uploads and request bodies, each with the status,
error code and message words the service documents for it (docs/service.md, the errors table).

Everything is generated here, nothing is a committed blob. The tests
(``tests/test_service_corpus.py``) post every case to an app with the default limits, and
``bench/soak.py`` mixes the small ones into its load. To look at the files themselves:

    python tests/bad_inputs.py OUT_DIR     # writes each case's body and an index.json

A case is a whole request body with its Content-Type, so that the same case can be sent by
httpx or written to a raw socket. Expectations assume the default settings
(``OODSERVE_MAX_UPLOAD_BYTES`` 10 MiB, ``OODSERVE_MAX_IMAGE_PIXELS`` 25,000,000,
``OODSERVE_MAX_BATCH_IMAGES`` 64, at most 16 form fields).
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BOUNDARY = "oodservecorpus"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes = field(repr=False)
    content_type: str | None  # None: no Content-Type header at all
    status: int
    code: str | None  # None for 200
    words: tuple[str, ...] = ()  # in the error message
    path: str = "/predict"
    what: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"content-type": self.content_type} if self.content_type else {}


# -- building blocks -------------------------------------------------------------------

def multipart(parts: list[tuple[str, bytes, bytes]]) -> bytes:
    """``parts``: (Content-Disposition value, Content-Type or b"", data)."""
    out = io.BytesIO()
    for disposition, content_type, data in parts:
        out.write(f"--{BOUNDARY}\r\nContent-Disposition: ".encode())
        out.write(disposition.encode("utf-8", "surrogateescape"))
        out.write(b"\r\n")
        if content_type:
            out.write(b"Content-Type: " + content_type + b"\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def upload(data: bytes, field_name: str = "image", filename: str = "upload.bin",
           content_type: bytes = b"application/octet-stream") -> bytes:
    return multipart([(f'form-data; name="{field_name}"; filename="{filename}"',
                       content_type, data)])


def noise(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, bit_depth: int, color_type: int, channels: int,
            idat: bytes | None = None) -> bytes:
    """A valid PNG of ``width x height`` all-zero pixels, compressed row by row so that a
    large image never exists in memory (``idat`` replaces the image data)."""
    if idat is None:
        row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)  # filter 0 + zeros
        compressor = zlib.compressobj(9)
        rows = 256
        block = row * rows
        chunks = [compressor.compress(block) for _ in range(height // rows)]
        chunks.append(compressor.compress(row * (height % rows)))
        idat = b"".join(chunks) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a baseline JPEG) with the frame header claiming ``width x height``."""
    sof = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def ycck_jpeg(image: Image.Image) -> bytes:
    """A four-channel JPEG whose Adobe APP14 marker says YCCK (transform 2). Pillow writes
    CMYK with transform 0; flipping the flag makes libjpeg read the channels as YCCK, the
    colour space Photoshop uses for CMYK JPEGs. The colours differ, the file is valid."""
    data = bytearray(encode(image.convert("CMYK"), "JPEG", quality=90))
    app14 = data.index(b"\xff\xee")
    if data[app14 + 4:app14 + 9] != b"Adobe":
        raise RuntimeError("Pillow wrote no Adobe marker")
    data[app14 + 15] = 2  # length(2) + "Adobe"(5) + version(2) + flags0(2) + flags1(2) -> transform
    return bytes(data)


def bmp_header_only(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\x00" * 16


# -- the corpus ------------------------------------------------------------------------

def build(upload_limit: int = DEFAULT_UPLOAD_LIMIT, max_batch_images: int = 64) -> list[Case]:
    rgb = noise(1)
    big = noise(2, (256, 192))
    jpeg, png = encode(big, "JPEG", quality=90), encode(big, "PNG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    rgba = rgb.convert("RGBA")
    alpha = np.zeros((rgb.height, rgb.width), dtype=np.uint8)
    alpha[:, rgb.width // 2:] = 255  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    sixteen = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    frames = [noise(s).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
              for s in (3, 4, 5)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                 loop=0)
    # 16-bit RGB PNG: Pillow cannot write it, so raw rows (big-endian 16-bit samples).
    rows = np.asarray(rgb, dtype=">u2") * 257
    png48 = png_raw(rgb.width, rgb.height, 16, 2, 3, idat=zlib.compress(b"".join(
        b"\x00" + r.tobytes() for r in rows)))

    idat = png.index(b"IDAT") + 200
    damaged = png[:idat] + bytes(b ^ 0x5A for b in png[idat:idat + 60]) + png[idat + 60:]
    ok = "decoded and scored"

    def image(name, data, status=200, code=None, words=(), what=ok, **kw):
        return Case(name, upload(data, **kw), MULTIPART, status, code, tuple(words),
                    what=what)

    many_fields = multipart([(f'form-data; name="f{i}"', b"", b"1") for i in range(3000)])
    oversize = upload(b"\xff" * (upload_limit + 1), filename="big.jpg",
                      content_type=b"image/jpeg")
    batch = multipart([(f'form-data; name="images"; filename="{i}.png"', b"image/png",
                        encode(noise(10 + i, (8, 8)), "PNG"))
                       for i in range(max_batch_images + 1)])
    html = (b"<!DOCTYPE html><html><head><title>cat</title></head><body>"
            b"<img src=x onerror=alert(1)></body></html>")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect/></svg>'

    return [
        # -- not images, or not what the API takes
        Case("empty_body", b"", None, 422, "invalid_request", ("image", "Field required"),
             what="POST with no body at all: the image field is missing"),
        image("empty_file", b"", 422, "empty_file", ("empty",), what="an image part of 0 bytes"),
        image("text_as_image", b"just some text, certainly not a picture\n", 415,
              "not_an_image", ("JPEG", "PNG"), filename="cat.jpg", content_type=b"image/jpeg",
              what="plain text sent as image/jpeg"),
        image("html_as_image", html, 415, "not_an_image", ("JPEG",), filename="cat.png",
              content_type=b"image/png", what="an HTML page sent as image/png"),
        image("svg_as_image", svg, 415, "not_an_image", ("JPEG",), filename="cat.svg",
              content_type=b"image/svg+xml", what="SVG is not among the formats"),
        image("tiff", encode(rgb, "TIFF"), 415, "not_an_image", ("JPEG",),
              what="TIFF: a real image, but not a format the API accepts"),
        Case("raw_jpeg_body", jpeg, "image/jpeg", 415, "not_multipart", ("multipart",),
             what="the JPEG as the whole body (wrong content type)"),
        Case("json_body", b'{"image": "aGVsbG8="}', "application/json", 415, "not_multipart",
             ("multipart",), what="JSON with a base64 string (wrong content type)"),
        Case("urlencoded_body", b"image=%FF%D8%FF", "application/x-www-form-urlencoded", 415,
             "not_multipart", ("multipart",), what="a URL-encoded form"),
        Case("multipart_without_boundary", b"--x\r\nnonsense", "multipart/form-data", 400,
             "bad_request", (), what="multipart Content-Type with no boundary"),
        Case("image_as_text_field",
             multipart([('form-data; name="image"', b"", b"not a file part")]), MULTIPART,
             422, "invalid_request", ("image", "UploadFile"),
             what="the image field sent as a text field (no filename)"),
        # -- broken images
        image("truncated_jpeg", jpeg[: len(jpeg) * 3 // 5], 422, "corrupt_image",
              ("truncated",), what="the first 60% of a JPEG"),
        image("truncated_png", png[: len(png) * 3 // 5], 422, "corrupt_image", ("truncated",),
              what="the first 60% of a PNG"),
        image("jpeg_header_only", jpeg[:200], 422, "corrupt_image", (),
              what="SOI and the first headers of a JPEG, nothing more"),
        image("png_bad_header_crc", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:], 415,
              "not_an_image", (), what="a PNG whose IHDR checksum is wrong: no format "
                                       "recognises the header"),
        image("png_damaged_data", damaged, 422, "corrupt_image", ("damaged",),
              what="a PNG with 60 bytes of its compressed data scrambled"),
        # -- too large to decode
        image("png_decompression_bomb", png_raw(20_000, 20_000, 1, 0, 1), 413,
              "too_many_pixels", ("25000000", "decompression bomb"),
              what="a complete 20000x20000 1-bit PNG (400 Mpx) in about 50 KB"),
        image("png_huge_header", png_raw(1_000_000, 1_000_000, 8, 2, 3, idat=zlib.compress(
            b"\x00" * 64)), 413, "too_many_pixels", ("25000000",),
              what="a PNG header claiming 10^12 pixels, 64 bytes of data"),
        image("jpeg_huge_header", jpeg_with_size(encode(rgb, "JPEG"), 65_000, 65_000), 413,
              "too_many_pixels", ("25000000",),
              what="a small JPEG whose frame header claims 65000x65000"),
        image("bmp_huge_header", bmp_header_only(50_000, 50_000), 413, "too_many_pixels",
              ("25000000",), what="a BMP header claiming 50000x50000, no pixels"),
        image("png_8000x8000", png_raw(8000, 8000, 8, 2, 3), 413, "too_many_pixels",
              ("8000x8000", "25000000"),
              what="a real 8000x8000 RGB PNG: 64 Mpx, over the default 25 Mpx"),
        image("sliver_1x30000", png_raw(1, 30_000, 8, 2, 3), 413, "too_many_pixels",
              ("resizing",), what="1x30000: few pixels, but resizing would blow it up"),
        # -- odd but valid images: all scored
        image("animated_gif", gif, what="3 frames; the first is scored"),
        image("cmyk_jpeg", encode(rgb.convert("CMYK"), "JPEG", quality=90)),
        image("ycck_jpeg", ycck_jpeg(rgb)),
        image("png_16bit_gray", encode(sixteen, "PNG")),
        image("png_16bit_rgb", png48),
        image("palette_png", encode(palette, "PNG")),
        image("palette_png_transparent", encode(transparent_palette, "PNG")),
        image("rgba_transparent", encode(rgba, "PNG"), what="half the pixels fully transparent"),
        image("la_png", encode(rgba.convert("LA"), "PNG")),
        image("one_pixel", encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
              what="1x1, upscaled"),
        image("webp", encode(rgb, "WEBP")),
        image("bmp", encode(rgb, "BMP")),
        image("odd_filename", encode(rgb, "PNG"), filename="../../etc/passwd\u202e.png",
              what="the filename is only echoed back in batch results, never used"),
        image("image_sent_as_text_plain", encode(rgb, "PNG"), content_type=b"text/plain",
              what="the part's Content-Type is ignored: the bytes decide"),
        # -- odd multipart
        Case("over_size_body", oversize, MULTIPART, 413, "body_too_large",
             (str(upload_limit),), what="one byte over the upload limit"),
        Case("thousands_of_fields", many_fields, MULTIPART, 400, "too_many_fields",
             ("16",), what="3000 text fields"),
        Case("too_many_images", batch, MULTIPART, 413, "too_many_images",
             (str(max_batch_images),), path="/predict/batch",
             what=f"{max_batch_images + 1} images in one batch request"),
        *(Case(f"field_name_{name}", upload(encode(rgb, "PNG"), field_name=field_name),
               MULTIPART, 422, "invalid_request", ("image", "Field required"), what=what)
          for name, field_name, what in [
              ("quotes", 'im\\"age', "a field name with an escaped quote is not 'image'"),
              ("unicode", "画像\u0000", "a non-ASCII field name with a NUL"),
              ("path", "../../image", "a path as the field name"),
              ("crlf", "image\r\nX-Injected: 1", "a CR LF inside the quoted field name")]),
        Case("field_name_missing", multipart([('form-data; filename="a.png"', b"image/png",
                                               encode(rgb, "PNG"))]), MULTIPART, 400,
             "bad_request", ("name",), what="a part with no name at all"),
        Case("field_name_huge", upload(encode(rgb, "PNG"), field_name="x" * 5000),
             MULTIPART, 400, "bad_request", ("multipart",),
             what="a 5000-character field name (over the parser's header limit)"),
    ]


def write(out_dir: Path, cases: list[Case]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for case in cases:
        (out_dir / f"{case.name}.body").write_bytes(case.body)
        entry = {k: v for k, v in asdict(case).items() if k != "body"}
        index.append({**entry, "file": f"{case.name}.body", "bytes": len(case.body)})
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/bad_inputs.py OUT_DIR")
    write(Path(sys.argv[1]), build())
