"""Stamp synthetic watermarks onto clean photos: evaluation data for the watermark filter.

Two kinds, as found on scraped photos: ``text`` (a credit, a stock-site name, a URL) and ``logo``
(a shape-only mark: ring, badge, star, chevrons; no letters, so a text detector is not expected to see
it). Three placements: one ``corner``, the ``centre``, or ``tiled`` across the whole image at an angle.
Opacity, font, size and colour vary; every choice is recorded in a ``Stamp`` so a result can be traced
back to what was drawn. Fonts come only from installed packages (Pillow's built-in font and the
DejaVu TTFs matplotlib ships), never from the system, so the data is the same on every machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("text", "logo")
PLACEMENTS = ("corner", "centre", "tiled")
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
LOGO_SHAPES = ("ring-star", "badge", "chevrons", "aperture")
COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
# Opacity buckets the evaluation reports on; stamps are drawn at 5-60 %, the range seen in the wild
# (below 5 % a stamp is invisible to people too; above 60 % it is an overlay, not a watermark).
OPACITY_BUCKETS = ((0.05, 0.10), (0.10, 0.20), (0.20, 0.40), (0.40, 0.60))
TEXTS = (
    "© STOCKPHOTO", "SAMPLE", "PREVIEW", "getty images", "shutterstock", "iStock", "© Jane Doe Photography",
    "www.example.com", "DO NOT COPY", "Adobe Stock", "dreamstime", "123RF", "© 2024 Studio North", "PROOF",
)
# Glyph height (text) or mark height (logo) as a fraction of the image's shorter side, per placement:
# corner credits are small, centre stamps large, tiled ones in between (measured by eye on stock sites).
SIZE_RANGE = {
    ("text", "corner"): (0.04, 0.09), ("text", "centre"): (0.08, 0.18), ("text", "tiled"): (0.05, 0.10),
    ("logo", "corner"): (0.10, 0.20), ("logo", "centre"): (0.25, 0.45), ("logo", "tiled"): (0.12, 0.20),
}


@dataclass(frozen=True)
class Stamp:
    """Everything that decides what is drawn; ``asdict`` of it is a row of the evaluation table."""

    kind: str  # text | logo
    placement: str  # corner | centre | tiled
    opacity: float  # alpha of the mark, 0..1
    size_frac: float  # glyph / mark height over the image's shorter side (shrunk to fit 90 % of the width)
    colour: str  # a key of COLOURS
    outline: bool  # a thin contrasting stroke around the mark, as many stock stamps have
    font: str = ""  # a key of available_fonts() (text only)
    text: str = ""  # text only
    shape: str = ""  # a LOGO_SHAPES entry (logo only)
    corner: str = ""  # a CORNERS entry (corner placement only)
    angle: float = 0.0  # degrees, counter-clockwise (tiled stamps are rotated)

    def as_row(self) -> dict:
        return asdict(self)


def opacity_bucket(opacity: float) -> str:
    for low, high in OPACITY_BUCKETS:
        if low <= opacity < high or (high == OPACITY_BUCKETS[-1][1] and opacity == high):
            return f"{round(low * 100)}-{round(high * 100)}%"
    return "other"


# Fonts the caller adds (``add_fonts``): the watermark benchmark adds system fonts it installed for itself,
# to judge the learned head on font families it was never trained on. Empty unless someone adds to it.
EXTRA_FONTS: dict[str, Path] = {}


def add_fonts(paths) -> None:
    """Draw also with these TTF/OTF files (named by file stem)."""
    for path in paths:
        EXTRA_FONTS[Path(path).stem] = Path(path)
    available_fonts.cache_clear()


@lru_cache(maxsize=1)
def available_fonts() -> dict[str, Path | None]:
    """Font name -> TTF path (None: Pillow's built-in scalable font). Only fonts inside installed packages,
    plus any ``add_fonts`` added."""
    fonts: dict[str, Path | None] = {"pillow-default": None, **EXTRA_FONTS}
    try:
        import matplotlib

        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        for name in ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSerif-Italic", "DejaVuSansMono"):
            if (ttf / f"{name}.ttf").is_file():
                fonts[name] = ttf / f"{name}.ttf"
    except ImportError:  # matplotlib is a project dependency, but the built-in font alone still works
        pass
    return fonts


@lru_cache(maxsize=256)
def load_font(name: str, size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = available_fonts()[name]
    size_px = max(6, int(size_px))
    return ImageFont.load_default(size=size_px) if path is None else ImageFont.truetype(str(path), size_px)


def random_stamp(rng: np.random.Generator, kind: str, placement: str, opacity: float | None = None) -> Stamp:
    """A random stamp of the given kind and placement (opacity drawn uniformly from 5-60 % when None)."""
    if kind not in KINDS or placement not in PLACEMENTS:
        raise ValueError(f"unknown stamp kind/placement {kind!r}/{placement!r}; kinds {KINDS}, placements {PLACEMENTS}")
    low, high = SIZE_RANGE[(kind, placement)]
    colour = str(rng.choice(list(COLOURS), p=[0.6, 0.25, 0.15]))  # white is the common stock stamp
    return Stamp(
        kind=kind,
        placement=placement,
        opacity=float(rng.uniform(0.05, 0.60)) if opacity is None else float(opacity),
        size_frac=float(rng.uniform(low, high)),
        colour=colour,
        outline=bool(rng.random() < 0.4),
        font=str(rng.choice(list(available_fonts()))) if kind == "text" else "",
        text=str(rng.choice(TEXTS)) if kind == "text" else "",
        shape=str(rng.choice(LOGO_SHAPES)) if kind == "logo" else "",
        corner=str(rng.choice(CORNERS)) if placement == "corner" else "",
        angle=float(rng.uniform(20, 40) * rng.choice([-1, 1])) if placement == "tiled" else float(rng.uniform(-8, 8)) if placement == "centre" else 0.0,
    )


# ---------------------------------------------------------------------------------------------- drawing


def _mark(spec: Stamp, height_px: int) -> Image.Image:
    """The stamp's mark alone, fully opaque, on a transparent tile; opacity is applied when compositing."""
    fill = COLOURS[spec.colour] + (255,)
    stroke = ((0, 0, 0, 255) if spec.colour != "black" else (255, 255, 255, 255)) if spec.outline else None
    stroke_px = max(1, height_px // 14) if spec.outline else 0
    if spec.kind == "text":
        font = load_font(spec.font, height_px)
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        left, top, right, bottom = probe.textbbox((0, 0), spec.text, font=font, stroke_width=stroke_px)
        tile = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((2 - left, 2 - top), spec.text, font=font, fill=fill, stroke_width=stroke_px, stroke_fill=stroke)
        return tile
    return _logo(spec.shape, height_px, fill, stroke, stroke_px)


def _logo(shape: str, size: int, fill: tuple, stroke: tuple | None, stroke_px: int) -> Image.Image:
    size = max(12, size)
    tile = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    c, r = size / 2, size / 2 - 1 - stroke_px
    width = max(2, size // 12)
    outline_kw = {"outline": stroke, "width": stroke_px} if stroke else {}
    if shape == "ring-star":
        draw.ellipse((c - r, c - r, c + r, c + r), outline=fill, width=width)
        points = [(c + (r * 0.7 if i % 2 == 0 else r * 0.3) * math.cos(math.pi / 5 * i - math.pi / 2),
                   c + (r * 0.7 if i % 2 == 0 else r * 0.3) * math.sin(math.pi / 5 * i - math.pi / 2)) for i in range(10)]
        draw.polygon(points, fill=fill, **outline_kw)
    elif shape == "badge":
        draw.rounded_rectangle((c - r, c - r * 0.7, c + r, c + r * 0.7), radius=r * 0.3, fill=fill, **outline_kw)
        draw.ellipse((c - r * 0.35, c - r * 0.35, c + r * 0.35, c + r * 0.35), fill=(0, 0, 0, 0))  # a hole, like a lens
    elif shape == "chevrons":
        for offset in (-0.45, 0.0, 0.45):
            y = c + offset * r
            draw.line([(c - r * 0.8, y - r * 0.25), (c, y + r * 0.2), (c + r * 0.8, y - r * 0.25)], fill=fill, width=width * 2, joint="curve")
    elif shape == "aperture":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=fill, **outline_kw)
        for i in range(6):  # six blades cut out of the disc
            a = math.pi / 3 * i
            x, y = c + r * 0.45 * math.cos(a), c + r * 0.45 * math.sin(a)
            draw.line([(x, y), (x + r * 0.5 * math.cos(a + 2.1), y + r * 0.5 * math.sin(a + 2.1))], fill=(0, 0, 0, 0), width=width)
    else:
        raise ValueError(f"unknown logo shape {shape!r}; known: {LOGO_SHAPES}")
    return tile


def stamp(img: Image.Image, spec: Stamp) -> Image.Image:
    """``img`` with the stamp composited at ``spec.opacity``; a new RGB image of the same size."""
    base = img.convert("RGBA")
    width, height = base.size
    height_px = max(6, round(spec.size_frac * min(width, height)))
    mark = _mark(spec, height_px)
    if spec.placement != "tiled" and mark.width > 0.9 * width:  # a long text at a large size: shrink it to fit
        mark = _mark(spec, max(6, int(height_px * 0.9 * width / mark.width)))
    if spec.angle:
        mark = mark.rotate(spec.angle, expand=True, resample=Image.BICUBIC)
    alpha = mark.getchannel("A").point(lambda a: round(a * spec.opacity))
    mark.putalpha(alpha)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    for xy in _positions(spec, base.size, mark.size):
        if _inside(xy, mark.size, base.size):
            layer.alpha_composite(mark, dest=xy)
        else:
            _paste_clipped(layer, mark, xy)
    return Image.alpha_composite(base, layer).convert("RGB")


def _positions(spec: Stamp, image_size: tuple[int, int], mark_size: tuple[int, int]) -> list[tuple[int, int]]:
    (width, height), (mw, mh) = image_size, mark_size
    margin = round(0.03 * min(width, height))
    if spec.placement == "centre":
        return [((width - mw) // 2, (height - mh) // 2)]
    if spec.placement == "corner":
        x = width - mw - margin if spec.corner.endswith("right") else margin
        y = height - mh - margin if spec.corner.startswith("bottom") else margin
        return [(max(0, x), max(0, y))]
    # tiled: a staggered grid with gaps of about half a mark, covering the image edge to edge
    step_x, step_y = max(8, round(mw * 1.4)), max(8, round(mh * 2.2))
    out = []
    for row, y in enumerate(range(-mh // 2, height, step_y)):
        for x in range(-mw // 2 - (step_x // 2) * (row % 2), width, step_x):
            out.append((x, y))
    return out


def _inside(xy: tuple[int, int], mark_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    return xy[0] >= 0 and xy[1] >= 0 and xy[0] + mark_size[0] <= image_size[0] and xy[1] + mark_size[1] <= image_size[1]


def _paste_clipped(layer: Image.Image, mark: Image.Image, xy: tuple[int, int]) -> None:
    """alpha_composite refuses marks that hang over the edge; crop the mark to the overlap first."""
    x, y = xy
    left, top = max(0, -x), max(0, -y)
    right, bottom = min(mark.width, layer.width - x), min(mark.height, layer.height - y)
    if right > left and bottom > top:
        layer.alpha_composite(mark.crop((left, top, right, bottom)), dest=(x + left, y + top))
