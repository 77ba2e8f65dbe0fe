"""Image verification before anything is stored: format, size, decompression-bomb limit, full decode."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from services.common.storage import sha256_hex
from services.retriever.sources import over_limit

MAX_IMAGE_BYTES = 25 * 1024 * 1024
# Pillow's own bomb threshold is ~89 Mpx; a document image never needs more than this.
MAX_IMAGE_PIXELS = 40_000_000
ALLOWED_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


class ImageRejected(ValueError):
    """The bytes are not an image we accept; the message says why, for the ingest summary."""


@dataclass(frozen=True)
class VerifiedImage:
    data: bytes
    sha256: str
    mime_type: str
    width: int
    height: int


def verify_image(data: bytes) -> VerifiedImage:
    if not data:
        raise ImageRejected("empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected(over_limit(len(data), MAX_IMAGE_BYTES))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                image_format, (width, height) = probe.format, probe.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageRejected(
                        f"{width}x{height} pixels is over the {MAX_IMAGE_PIXELS:,} pixel limit "
                        "(decompression bomb guard)"
                    )
                probe.verify()
            # verify() checks structure only; decoding every pixel catches truncated files.
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError as error:
        raise ImageRejected("not an image (Pillow does not recognise the bytes)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"decompression bomb: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(f"corrupt image: {error}") from error
    if image_format not in ALLOWED_FORMATS:
        raise ImageRejected(f"format {image_format} is not accepted ({', '.join(ALLOWED_FORMATS)})")
    return VerifiedImage(
        data=data,
        sha256=sha256_hex(data),
        mime_type=ALLOWED_FORMATS[image_format],
        width=width,
        height=height,
    )
