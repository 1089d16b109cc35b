"""Safe image decoding: every failure becomes a human-readable reason, never a crash.

Pillow's own decompression-bomb guard warns and then raises at twice its limit; we check the header's
size against our own limit *before* decoding a pixel, so a 40 000 x 40 000 header costs nothing.
"""

from __future__ import annotations

import errno
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Our limit is checked explicitly below; Pillow's is lifted so its warning does not fire first.
Image.MAX_IMAGE_PIXELS = None


class ImageError(Exception):
    """Decoding failed; ``str(exc)`` is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Probe:
    """What decoding one file told us: size after EXIF rotation, container format, original pixel mode."""

    width: int
    height: int
    format: str
    mode: str


def read_file(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except PermissionError:
        raise ImageError("unreadable: permission denied") from None
    except IsADirectoryError:
        raise ImageError("not a file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("unreadable: symlink loop") from None
        if exc.errno == errno.ENOENT:
            raise ImageError("unreadable: broken symlink or vanished file") from None
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None


def decode(data: bytes, max_pixels: int) -> tuple[Image.Image, Probe]:
    """Decode bytes to an RGB image with EXIF orientation applied; raise ImageError with a reason."""
    if not data:
        raise ImageError("empty: 0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image: format not recognised") from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageError(f"corrupt header: {exc}") from None
    fmt, source_mode = img.format or "unknown", img.mode
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"too large: {width}x{height} = {width * height / 1e6:.1f} Mpx > max_pixels {max_pixels / 1e6:.1f} Mpx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings are handled below
            img.load()  # first frame only for animated formats
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except Exception as exc:
        raise ImageError(f"truncated or corrupt: {exc}") from None
    return img, Probe(width=img.width, height=img.height, format=fmt, mode=source_mode)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode (L, LA, P, RGBA, CMYK, I;16, I, F) to 8-bit RGB; transparency over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def read_verified(path: Path | str, sha256_hex: str) -> bytes:
    """The bytes of a file, after checking they still have the manifest's sha256: a result memoised by
    content hash must be computed from that content, not from a file edited since."""
    data = read_file(path)
    if hashlib.sha256(data).hexdigest() != sha256_hex:
        raise ImageError("changed since ingest: content differs from the manifest's sha256 (rerun ingest)")
    return data


def load_verified(path: Path | str, sha256_hex: str, max_pixels: int) -> Image.Image:
    """Decode a file that ingest accepted, after checking its content hash (``read_verified``)."""
    return decode(read_verified(path, sha256_hex), max_pixels)[0]


def load_rgb(path: Path | str, max_pixels: int) -> Image.Image:
    """Decode a file that ingest already accepted (still guarded: files can change under us)."""
    return decode(read_file(path), max_pixels)[0]


def center_square(img: Image.Image, size_px: int) -> Image.Image:
    """Centre-crop to a square and resize with LANCZOS (the filter the codec's quality was measured with)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size_px:
        img = img.resize((size_px, size_px), Image.LANCZOS)
    return img


def probe(data: bytes, max_pixels: int) -> Probe:
    return decode(data, max_pixels)[1]
