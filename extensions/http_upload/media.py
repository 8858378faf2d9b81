"""Unencrypted images on their way in: metadata stripped and a thumbnail made (Pillow), in a thread.

A file is an image here only if Pillow recognises it as JPEG, PNG or WebP; anything else (an OMEMO or
aesgcm file, which is random bytes, a PDF...) is opaque and never touched. A recognised image that does
not decode (truncated, corrupt) or whose pixel count passes the limit (a decompression bomb: a small file
of huge dimensions) is refused with `BadImage`; the pixel count is read from the header, before anything
is decoded, so a bomb costs nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
ORIENTATION = 0x0112  # the EXIF tag kept when stripping, so the picture stays upright


class BadImage(Exception):
    """An image that cannot be decoded, or is too large to."""


@dataclass(frozen=True)
class Processed:
    stripped: bytes | None  # the image without its metadata, None when it had none to strip
    thumbnail: bytes | None
    thumbnail_type: str | None


def process(path: Path, strip: bool, thumbnail_size: int, max_pixels: int) -> Processed | None:
    """What to store instead of and beside the image at `path`; None when it is not an image we handle."""
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"the image cannot be read: {exc}") from None
    with image:
        if image.format not in FORMATS:
            return None
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage(f"the image has {width}x{height} pixels, more than the {max_pixels} allowed")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadImage(f"the image is damaged: {exc}") from None
        # An animation (APNG, animated WebP) is left whole: saving it again could lose frames or their timing.
        animated = getattr(image, "n_frames", 1) > 1
        stripped = _stripped(image) if strip and not animated and _has_metadata(image) else None
        if not thumbnail_size:
            return Processed(stripped, None, None)
        thumb = ImageOps.exif_transpose(image)
        thumb.thumbnail((thumbnail_size, thumbnail_size))
        out = io.BytesIO()
        if thumb.mode in ("RGBA", "LA", "P"):
            thumb.save(out, "PNG", optimize=True)
            return Processed(stripped, out.getvalue(), "image/png")
        thumb.convert("RGB").save(out, "JPEG", quality=80)
        return Processed(stripped, out.getvalue(), "image/jpeg")


def _has_metadata(image: Image.Image) -> bool:
    exif = image.getexif()
    if set(exif) - {ORIENTATION} or any(key in image.info for key in ("xmp", "XML:com.adobe.xmp", "comment")):
        return True
    return image.format == "PNG" and any(isinstance(v, str) for v in image.info.values())


def _stripped(image: Image.Image) -> bytes:
    """The image saved again without EXIF (but its orientation), XMP, comments or text chunks; a JPEG keeps its
    quantisation tables, so it loses as little as a re-encoding can."""
    kept = Image.Exif()
    orientation = image.getexif().get(ORIENTATION)
    if orientation:
        kept[ORIENTATION] = orientation
    options: dict[str, object] = {"exif": kept.tobytes()} if orientation else {}
    if "icc_profile" in image.info:
        options["icc_profile"] = image.info["icc_profile"]
    out = io.BytesIO()
    if image.format == "JPEG":
        image.save(out, "JPEG", quality="keep", **options)
    elif image.format == "WEBP":
        image.save(out, "WEBP", lossless=bool(image.info.get("lossless")), quality=90, **options)
    else:
        image.save(out, "PNG", **options)
    return out.getvalue()
