"""A corpus of malformed and unusual image files, for fault-injection tests and benchmarks.

Each kind is what real photo folders contain sooner or later. ``EXPECTED`` says what curation must do
with it: ``kept`` (an odd but valid image), ``rejected`` (with a reason), or ``either`` (a bit flip may
leave a decodable image). Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXPECTED = {
    "truncated": "rejected",
    "bit_flip": "either",
    "wrong_extension": "kept",  # a PNG named .jpg is still a good image
    "zero_bytes": "rejected",
    "one_pixel": "rejected",
    "bomb_header": "rejected",
    "cmyk": "kept",
    "gray16": "kept",
    "palette_transparency": "kept",
    "animated_gif": "kept",
    "exif_rotated": "kept",
    "symlink_loop": "rejected",
    "unreadable": "rejected",  # kept when running as root, who can read anything: see ``expected_for``
    "non_utf8_name": "rejected",
}


def expected_for(kind: str) -> str:
    if kind == "unreadable" and os.geteuid() == 0:
        return "kept"
    return EXPECTED[kind]


def _photo(rng: np.random.Generator, size_px: int = 128) -> Image.Image:
    """A smooth random photo-like image (gradients plus noise), so every file has distinct content."""
    y, x = np.mgrid[0:size_px, 0:size_px] / size_px
    channels = [np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 9)) for _ in range(3)]
    arr = (np.stack(channels, -1) * 0.4 + 0.5 + rng.normal(0, 0.03, (size_px, size_px, 3))).clip(0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: only the header is ever needed to reject it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_corpus(dest: Path, seed: int = 0, per_kind: int = 1) -> dict[str, list[Path]]:
    """Write ``per_kind`` files of every kind in EXPECTED into ``dest``; return their paths by kind."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[Path]] = {kind: [] for kind in EXPECTED}

    def put(kind: str, name: str, data: bytes) -> Path:
        path = dest / name
        path.write_bytes(data)
        made[kind].append(path)
        return path

    for i in range(per_kind):
        jpeg = _encode(_photo(rng), "JPEG", quality=90)
        put("truncated", f"truncated_{i}.jpg", jpeg[: int(rng.integers(20, len(jpeg) - 20))])
        flipped = bytearray(_encode(_photo(rng), "JPEG", quality=90))
        for offset in rng.integers(2, len(flipped), size=8):
            flipped[offset] ^= 1 << int(rng.integers(0, 8))
        put("bit_flip", f"bit_flip_{i}.jpg", bytes(flipped))
        put("wrong_extension", f"png_named_jpg_{i}.jpg", _encode(_photo(rng), "PNG"))
        put("zero_bytes", f"zero_{i}.jpg", b"")
        put("one_pixel", f"one_pixel_{i}.png", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
        put("bomb_header", f"bomb_{i}.png", bomb_png(40_000, 40_000))
        put("cmyk", f"cmyk_{i}.jpg", _encode(_photo(rng).convert("CMYK"), "JPEG", quality=90))
        deep = (np.asarray(_photo(rng).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        put("gray16", f"gray16_{i}.png", _encode(Image.fromarray(deep), "PNG"))
        palette = _photo(rng).convert("P", palette=Image.ADAPTIVE, colors=64)
        put("palette_transparency", f"palette_{i}.png", _encode(palette, "PNG", transparency=0))
        frames = [_photo(rng).convert("P", palette=Image.ADAPTIVE) for _ in range(3)]
        put("animated_gif", f"animated_{i}.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0))
        rotated = _photo(rng).resize((160, 96))
        exif = rotated.getexif()
        exif[0x0112] = 6  # displayed rotated by 90 degrees
        put("exif_rotated", f"exif_rotated_{i}.jpg", _encode(rotated, "JPEG", exif=exif))
        loop = dest / f"loop_{i}.jpg"
        os.symlink(loop.name, loop)  # points at itself
        made["symlink_loop"].append(loop)
        locked = put("unreadable", f"unreadable_{i}.png", _encode(_photo(rng), "PNG"))
        locked.chmod(0)
        bad_name = os.fsencode(dest) + b"/caf\xe9_" + str(i).encode() + b".png"  # Latin-1 byte, invalid UTF-8
        with open(bad_name, "wb") as f:
            f.write(_encode(_photo(rng), "PNG"))
        made["non_utf8_name"].append(Path(os.fsdecode(bad_name)))
    return made


def make_good(dest: Path, count: int, seed: int = 1, size_px: int = 128) -> list[Path]:
    """``count`` distinct, valid JPEG photos."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = dest / f"good_{i:04d}.jpg"
        path.write_bytes(_encode(_photo(rng, size_px), "JPEG", quality=90))
        paths.append(path)
    return paths
