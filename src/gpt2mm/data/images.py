"""Safe image loading: every bad image fails here, with the file named, instead of deep in a training step.

`load_image` reads the file (refusing missing files and files over `max_bytes`), reads the header and refuses
images over `max_pixels` BEFORE decoding (a decompression bomb: a small file that declares a huge image),
then decodes fully, so a truncated file fails here and not later, and converts to RGB. The pixel limit is
ours, per call: PIL's global `Image.MAX_IMAGE_PIXELS` check only warns below twice its value, and the
process may have changed it. (PIL's check still runs first: its error becomes a `DataError`; its warning,
for a `max_pixels` above PIL's limit, is left alone, since changing warning filters is not thread-safe.)
`load_image_bytes` applies the same checks to bytes (uploads to the server).

Not handled: EXIF orientation is not applied (CLIP/LLaVA pipelines do not either); only the first frame of
an animated image is used; a process that sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` lets truncated
images through (PIL pads them), since that flag is global.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from gpt2mm.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a 48 MP photo passes, decoding it takes ~190 MB as RGB
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Decoders allowed by default: the formats of image datasets and of uploads. Fewer decoders, less attack
# surface for bytes from the network; pass formats=None to allow everything PIL knows.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (phone photos)


def load_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    formats: tuple[str, ...] | None = DEFAULT_FORMATS,
) -> Image.Image:
    """A fully decoded RGB image from a file; `DataError` naming the file for anything wrong with it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise DataError(f"{path}: not a file")
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the image file ({e})") from e
    if size > max_bytes:
        raise DataError(f"{path}: {size} bytes, over the limit of {max_bytes} bytes for an image file")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise DataError(f"{path}: cannot read the image file ({e})") from e
    return load_image_bytes(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats, name=str(path))


def load_image_bytes(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    formats: tuple[str, ...] | None = DEFAULT_FORMATS,
    name: str = "image data",
) -> Image.Image:
    """A fully decoded RGB image from encoded bytes, with the checks of `load_image`; `name` is used in
    error messages (a file name, or e.g. "uploaded image")."""
    if len(data) > max_bytes:
        raise DataError(
            f"{name}: {len(data)} bytes or more, over the limit of {max_bytes} bytes for an image"
        )
    if not data:
        raise DataError(f"{name}: empty, not an image")
    if formats is not None:
        Image.init()  # registers every plugin (once), so that unknown names can be dropped
        formats = tuple(f for f in formats if f.upper() in Image.OPEN)  # e.g. WEBP missing from a build
    try:
        image = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: refused as a decompression bomb ({e})") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError, struct.error...
        allowed = f" (allowed formats: {', '.join(formats)})" if formats else ""
        raise DataError(f"{name}: not an image file{allowed}: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(
            f"{name}: header declares {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (a possible decompression bomb; raise max_pixels if the image is genuine)"
        )
    if width <= 0 or height <= 0:
        raise DataError(f"{name}: header declares an empty image ({width}x{height})")
    try:
        image.load()  # full decode: a truncated or corrupt file fails here
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # the path PIL asks for; the alpha is then dropped
        return image.convert("RGB")
    except Exception as e:
        raise DataError(f"{name}: truncated or corrupt {image.format} image: {e}") from e
