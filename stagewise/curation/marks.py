"""Synthetic watermarks for *training* the watermark head; the evaluation never draws from here.

``stagewise.curation.stamp`` is the evaluation's generator and this one is kept disjoint from it, so the
benchmark measures marks the head never saw: other fonts (TRAIN_FONTS excludes every font stamp.py
draws with), other texts (made up here from syllables, never stamp.TEXTS), other shapes (random polygons,
stars, rings, glyph badges: never stamp.LOGO_SHAPES) and another compositor (numpy blend modes here,
Pillow's alpha_composite there). What varies, as on scraped photos: text from a large credit down to
small edge text (a URL, a (c) line), signature-like strokes, logos, tiling at an angle; white, black,
grey or any colour; blend modes normal / multiply / screen / overlay and an emboss relief; drop shadow
and outline; opacity 6-70 %; JPEG quality 60-95 afterwards.

``synthesize`` returns the stamped RGB image and the mark's coverage mask (where the mark is drawn,
whatever its opacity): the head's supervision.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from stagewise.curation import stamp as eval_stamp

KINDS = ("text", "edge_text", "logo", "signature", "tiled")
KIND_WEIGHTS = (0.25, 0.25, 0.2, 0.1, 0.2)
BLENDS = ("normal", "multiply", "screen", "overlay", "emboss")
BLEND_WEIGHTS = (0.5, 0.1, 0.15, 0.1, 0.15)
SYLLABLES = ("ka", "lo", "mi", "ter", "vu", "pho", "to", "ra", "zen", "bri", "quo", "lux", "nor", "sta", "gra", "fel", "dio", "mar",
             "pix", "vel", "cor", "tan", "sol", "ix", "ent", "um", "ar", "ol")
TLDS = (".com", ".net", ".org", ".io", ".de", ".co.uk", ".fr", ".photo")


@lru_cache(maxsize=1)
def train_fonts() -> tuple[Path, ...]:
    """matplotlib's TTFs (DejaVu variants, STIX, Computer Modern) minus every font the evaluation uses."""
    import matplotlib

    held_out = {Path(p).name for p in eval_stamp.available_fonts().values() if p is not None}
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    skip = ("STIXSiz", "STIXNonUni", "cmex", "cmsy", "cmmi", "LastResort")  # symbol fonts: no Latin letters
    fonts = tuple(p for p in sorted(ttf.glob("*.ttf")) if p.name not in held_out and not p.name.startswith(skip))
    if not fonts:
        raise FileNotFoundError(f"no training fonts in {ttf} (matplotlib's fonts folder)")
    return fonts


@lru_cache(maxsize=512)
def _font(path: Path, size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), max(6, int(size_px)))


def random_text(rng: np.random.Generator) -> str:
    """A made-up credit, site or label; never one of the evaluation's texts."""
    word = lambda n: "".join(rng.choice(SYLLABLES, size=n))  # noqa: E731
    form = rng.integers(7)
    if form == 0:
        text = f"www.{word(rng.integers(2, 4))}{rng.choice(TLDS)}"
    elif form == 1:
        text = f"© {word(2).title()} {word(rng.integers(2, 4)).title()}"
    elif form == 2:
        text = f"© {rng.integers(1990, 2030)} {word(rng.integers(2, 4)).title()}"
    elif form == 3:
        text = word(rng.integers(2, 4)).upper()
    elif form == 4:
        text = f"{word(2)}{rng.choice(['stock', 'pix', 'foto', 'images', 'media'])}"
    elif form == 5:
        text = f"{word(2).title()} {word(3).title()} Photography"
    else:
        text = f"#{rng.integers(10000, 999999)}"
    if text in eval_stamp.TEXTS:  # cannot happen with these syllables; a guard against edits to either list
        text = text + "x"
    return text


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r = rng.random()
    if r < 0.45:
        return (255, 255, 255)
    if r < 0.65:
        return (0, 0, 0)
    if r < 0.8:
        v = int(rng.integers(60, 200))
        return (v, v, v)
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _text_tile(rng: np.random.Generator, text: str, height_px: int) -> Image.Image:
    """The text as an 'L' coverage tile (255 = ink)."""
    font = _font(train_fonts()[rng.integers(len(train_fonts()))], height_px)
    stroke = int(rng.integers(1, max(2, height_px // 10))) if rng.random() < 0.3 else 0
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font, stroke_width=stroke)
    tile = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(tile).text((2 - left, 2 - top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return tile


def _logo_tile(rng: np.random.Generator, size_px: int) -> Image.Image:
    """A shape-and-glyph mark: random polygon, n-point star, ring(s), or a letter in a disc / ring."""
    size = max(12, int(size_px))
    tile = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(tile)
    c, r = size / 2, size / 2 - 1
    width = max(1, int(size * rng.uniform(0.04, 0.12)))
    form = rng.integers(5)
    if form == 0:  # random convex-ish polygon
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        pts = [(c + r * math.cos(a), c + r * math.sin(a)) for a in angles]
        draw.polygon(pts, fill=255) if rng.random() < 0.5 else draw.line(pts + [pts[0]], fill=255, width=width)
    elif form == 1:  # star with n points
        n, inner = int(rng.integers(4, 9)), rng.uniform(0.3, 0.6)
        pts = [(c + r * (1 if i % 2 == 0 else inner) * math.cos(math.pi / n * i), c + r * (1 if i % 2 == 0 else inner) * math.sin(math.pi / n * i))
               for i in range(2 * n)]
        draw.polygon(pts, fill=255)
    elif form == 2:  # concentric rings
        for k in range(int(rng.integers(1, 4))):
            rr = r * (1 - 0.3 * k)
            draw.ellipse((c - rr, c - rr, c + rr, c + rr), outline=255, width=width)
    else:  # a letter or two, in a disc (knocked out) or a ring
        letters = "".join(rng.choice(list("ABDEFGHKMNPRSTWXZ"), size=int(rng.integers(1, 3))))
        font = _font(train_fonts()[rng.integers(len(train_fonts()))], int(size * 0.55))
        if form == 3:
            draw.ellipse((0, 0, size - 1, size - 1), fill=255)
            draw.text((c, c), letters, font=font, fill=0, anchor="mm")
        else:
            draw.ellipse((0, 0, size - 1, size - 1), outline=255, width=width)
            draw.text((c, c), letters, font=font, fill=255, anchor="mm")
    return tile


def _signature_tile(rng: np.random.Generator, height_px: int) -> Image.Image:
    """A handwriting-like stroke: a wandering pen (sums of sines) with loops, in one or two lines."""
    h = max(10, int(height_px))
    w = int(h * rng.uniform(2.5, 6))
    tile = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(tile)
    t = np.linspace(0, 1, 200)
    x = t * (w - 4) + 2 + sum(rng.uniform(0, h * 0.15) * np.sin(2 * math.pi * (rng.uniform(4, 14) * t + rng.random())) for _ in range(2))
    y = h / 2 + sum(rng.uniform(0.1, 0.3) * h * np.sin(2 * math.pi * (rng.uniform(3, 12) * t + rng.random())) for _ in range(3))
    draw.line(list(zip(np.clip(x, 0, w - 1), np.clip(y, 0, h - 1))), fill=255, width=max(1, h // int(rng.integers(12, 25))), joint="curve")
    if rng.random() < 0.5:  # an underline flourish
        y0 = h * rng.uniform(0.75, 0.9)
        draw.line([(w * 0.1, y0), (w * 0.9, y0 + rng.uniform(-0.1, 0.1) * h)], fill=255, width=max(1, h // 20))
    return tile


def _place(coverage: Image.Image, tile: Image.Image, xy: tuple[int, int]) -> None:
    coverage.paste(Image.new("L", tile.size, 255), xy, tile)  # full ink through the tile as a mask: overlaps only add ink


def _positions(rng: np.random.Generator, size: tuple[int, int], tile: tuple[int, int], where: str) -> list[tuple[int, int]]:
    (w, h), (tw, th) = size, tile
    if where == "tiled":
        step_x, step_y = max(8, int(tw * rng.uniform(1.1, 2.0))), max(8, int(th * rng.uniform(1.5, 3.5)))
        stagger = rng.random() < 0.6
        return [(x - (step_x // 2) * (row % 2) * stagger, y) for row, y in enumerate(range(-th // 2, h, step_y)) for x in range(-tw // 2, w, step_x)]
    if where == "edge":  # hugging a side or corner, as stock credits do
        margin_x, margin_y = int(rng.uniform(0, 0.04) * w), int(rng.uniform(0, 0.04) * h)
        x = [margin_x, (w - tw) // 2, w - tw - margin_x][rng.integers(3)]
        y = [margin_y, h - th - margin_y][rng.integers(2)]
        return [(max(0, x), max(0, y))]
    if where == "centre":
        return [((w - tw) // 2 + int(rng.normal(0, 0.05) * w), (h - th) // 2 + int(rng.normal(0, 0.05) * h))]
    return [(int(rng.uniform(0, max(1, w - tw))), int(rng.uniform(0, max(1, h - th))))]


def _coverage(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> Image.Image:
    """Where the mark is drawn, as an 'L' image of the photo's size (255 = full ink)."""
    w, h = size
    short = min(w, h)
    coverage = Image.new("L", size, 0)
    if kind == "tiled":
        sub = rng.choice(["text", "logo"], p=[0.7, 0.3])
        tile = _text_tile(rng, random_text(rng), short * rng.uniform(0.03, 0.09)) if sub == "text" else _logo_tile(rng, short * rng.uniform(0.08, 0.18))
        where = "tiled"
    elif kind == "edge_text":
        tile, where = _text_tile(rng, random_text(rng), short * rng.uniform(0.015, 0.04)), "edge"
    elif kind == "text":
        tile, where = _text_tile(rng, random_text(rng), short * rng.uniform(0.04, 0.18)), str(rng.choice(["edge", "centre", "anywhere"]))
    elif kind == "logo":
        tile, where = _logo_tile(rng, short * rng.uniform(0.08, 0.4)), str(rng.choice(["edge", "centre", "anywhere"]))
        if rng.random() < 0.4:  # logo + a word beside it, as many brand marks are
            word = _text_tile(rng, random_text(rng), tile.height * rng.uniform(0.3, 0.6))
            both = Image.new("L", (tile.width + word.width + 4, max(tile.height, word.height)), 0)
            both.paste(tile, (0, (both.height - tile.height) // 2))
            both.paste(word, (tile.width + 4, (both.height - word.height) // 2))
            tile = both
    else:
        tile, where = _signature_tile(rng, short * rng.uniform(0.06, 0.2)), str(rng.choice(["edge", "anywhere"]))
    if where != "tiled" and tile.width > 0.95 * w:
        tile = tile.resize((int(0.95 * w), max(1, int(tile.height * 0.95 * w / tile.width))), Image.BILINEAR)
    angle = rng.uniform(15, 45) * rng.choice([-1, 1]) if where == "tiled" else rng.uniform(-90, 90) if rng.random() < 0.1 else rng.uniform(-10, 10)
    if abs(angle) > 0.5:
        tile = tile.rotate(angle, expand=True, resample=Image.BILINEAR)
    for xy in _positions(rng, size, tile.size, where):
        _place(coverage, tile, xy)
    return coverage


def _composite(rng: np.random.Generator, photo: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Blend the mark into ``photo`` (float 0..1, HxWx3) with a random colour, opacity, blend mode and effects."""
    opacity = rng.uniform(0.06, 0.7)
    colour = np.asarray(_colour(rng), dtype=np.float32) / 255
    alpha = coverage[..., None]
    out = photo
    if rng.random() < 0.25:  # drop shadow: a darker, blurred, offset copy under the mark
        shift = max(1, int(round(coverage.shape[0] * 0.004)))
        shadow = np.roll(np.roll(coverage, shift, 0), shift, 1)
        shadow = np.asarray(Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(shift)), dtype=np.float32)[..., None] / 255
        out = out * (1 - shadow * opacity * 0.8)
    blend = BLENDS[rng.choice(len(BLENDS), p=BLEND_WEIGHTS)]
    if blend == "emboss":  # relief: light on one side of each stroke, dark on the other, no colour of its own
        relief = coverage - np.roll(np.roll(coverage, 1, 0), 1, 1)
        return np.clip(out + relief[..., None] * opacity * 0.8, 0, 1)
    if blend == "multiply":
        top = out * colour
    elif blend == "screen":
        top = 1 - (1 - out) * (1 - colour)
    elif blend == "overlay":
        top = np.where(out < 0.5, 2 * out * colour, 1 - 2 * (1 - out) * (1 - colour))
    else:
        top = np.broadcast_to(colour, out.shape)
    if rng.random() < 0.3:  # a contrasting outline around the ink
        ring = np.asarray(Image.fromarray((coverage * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3)), dtype=np.float32)[..., None] / 255
        edge = np.clip(ring - alpha, 0, 1)
        out = out * (1 - edge * opacity) + (1 - colour) * edge * opacity
    return np.clip(out * (1 - alpha * opacity) + top * alpha * opacity, 0, 1)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def synthesize(rng: np.random.Generator, photo: Image.Image, kind: str | None) -> tuple[Image.Image, np.ndarray]:
    """(``photo`` stamped with one random mark of ``kind`` then JPEG-compressed at quality 60-95, the mark's
    coverage as float32 HxW in 0..1). ``kind=None``: the clean photo, JPEG-compressed the same way, and an
    all-zero mask, so compression artefacts alone never tell the head a mark is there."""
    photo = photo.convert("RGB")
    coverage = np.zeros((photo.height, photo.width), dtype=np.float32)
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown mark kind {kind!r}; kinds {KINDS}")
        coverage = np.asarray(_coverage(rng, kind, photo.size), dtype=np.float32) / 255
        mixed = _composite(rng, np.asarray(photo, dtype=np.float32) / 255, coverage)
        photo = Image.fromarray((mixed * 255 + 0.5).astype(np.uint8))
    return jpeg(photo, int(rng.integers(60, 96))), coverage


def random_kind(rng: np.random.Generator) -> str:
    return KINDS[rng.choice(len(KINDS), p=KIND_WEIGHTS)]
