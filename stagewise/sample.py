"""The embedded sample: two domains cropped from photos that ship inside installed packages.

A is scikit-image's astronaut (Eileen Collins), B is matplotlib's grace_hopper.jpg. Each clean crop
varies scale, offset, a small rotation and colour, like a face set extracted from video. Deliberate
defects exercise curation: three watermarked copies, a truncated JPEG, a zero-byte file, a text file
named .jpg, an exact duplicate and an image below the minimum size. ``a_unseen/`` and ``b_unseen/`` hold
crops no stage trains on (outside the domain folders): the swap stage's new frames. Deterministic for a seed.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from stagewise.config import Section
from stagewise.io import write_bytes, write_json, write_text


class SampleConfig(Section):
    seed: int = 0
    crops_per_domain: int = 24  # the minimum; enough for a visible reconstruction on CPU
    size_px: int = 512  # the final growth resolution, so no stage trains on upscaled crops
    jpeg_quality: int = 92
    watermark_opacity: float = 0.55  # semi-transparent, as stock-photo stamps are
    small_px: int = 40  # the too-small defect; below ingest's default min_side_px of 64
    unseen_per_domain: int = 4  # crops in <out>/<domain>_unseen/, outside the domain folders: new frames for the swap stage


@dataclass(frozen=True)
class Source:
    image: Image.Image
    centre: tuple[float, float]  # (x, y) of the face, in pixels
    face_px: float  # rough face size, sets the crop scale


def sources() -> dict[str, Source]:
    import matplotlib.cbook
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut())
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    return {
        "a": Source(astronaut, centre=(235, 165), face_px=150),
        "b": Source(hopper, centre=(255, 200), face_px=230),
    }


def random_crop(src: Source, rng: np.random.Generator, size_px: int) -> Image.Image:
    """A face-centred crop with random scale, offset, rotation and colour jitter."""
    side = src.face_px * rng.uniform(1.5, 2.1)
    cx = src.centre[0] + rng.uniform(-0.08, 0.08) * side
    cy = src.centre[1] + rng.uniform(-0.08, 0.08) * side
    # Keep the crop inside the photo: a black band would teach the model a border that is not there.
    half = side / 2
    cx = float(np.clip(cx, half, src.image.width - half))
    cy = float(np.clip(cy, half, src.image.height - half))
    angle = rng.uniform(-8, 8)
    img = src.image.rotate(angle, resample=Image.BICUBIC, center=(cx, cy), fillcolor=(0, 0, 0))
    img = img.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    img = img.resize((size_px, size_px), Image.LANCZOS)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    return img


def stamp_watermark(img: Image.Image, text: str, opacity: float, rng: np.random.Generator) -> Image.Image:
    """Stamp large semi-transparent text across the image, as stock-photo sites do."""
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(24, base.width // 9))
    alpha = round(255 * opacity)
    box = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = box[2] - box[0], box[3] - box[1]
    x = (base.width - text_w) / 2 + rng.uniform(-0.05, 0.05) * base.width
    for y in (base.height * 0.2, base.height * 0.5, base.height * 0.8):
        draw.text((x, y - text_h / 2), text, font=font, fill=(255, 255, 255, alpha), stroke_width=2, stroke_fill=(0, 0, 0, alpha))
    return Image.alpha_composite(base, layer).convert("RGB")


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_sample(out: Path, cfg: SampleConfig) -> dict[str, list[str]]:
    """Write ``out/a`` and ``out/b``; return the injected defects by kind (paths relative to ``out``)."""
    if out.exists():
        shutil.rmtree(out)  # a DVC output we own; rebuilt whole so it is a pure function of the seed
    rng = np.random.default_rng(cfg.seed)
    clean: dict[str, list[str]] = {}
    for domain, src in sources().items():
        clean[domain] = []
        for index in range(cfg.crops_per_domain):
            name = f"{domain}/{domain}_{index:03d}.jpg"
            write_bytes(out / name, jpeg_bytes(random_crop(src, rng, cfg.size_px), cfg.jpeg_quality))
            clean[domain].append(name)

    defects: dict[str, list[str]] = {"watermark": [], "truncated": [], "empty": [], "not_image": [], "duplicate": [], "too_small": []}
    for index, (domain, text) in enumerate([("a", "© STOCKPHOTO"), ("b", "SAMPLE PREVIEW"), ("a", "watermark.com")]):
        original = out / clean[domain][index]
        stamped = stamp_watermark(Image.open(original), text, cfg.watermark_opacity, rng)
        name = f"{domain}/{domain}_{index:03d}_stock.jpg"
        write_bytes(out / name, jpeg_bytes(stamped, cfg.jpeg_quality))
        defects["watermark"].append(name)

    full = (out / clean["b"][3]).read_bytes()
    write_bytes(out / "b/b_truncated.jpg", full[: len(full) * 3 // 5])
    defects["truncated"].append("b/b_truncated.jpg")
    write_bytes(out / "a/a_empty.jpg", b"")
    defects["empty"].append("a/a_empty.jpg")
    write_text(out / "b/b_notes.jpg", "This is a text file that only pretends to be a JPEG.\n")
    defects["not_image"].append("b/b_notes.jpg")
    write_bytes(out / "a/a_copy_of_004.jpg", (out / clean["a"][4]).read_bytes())
    defects["duplicate"].append("a/a_copy_of_004.jpg")
    tiny = Image.open(out / clean["b"][5]).resize((cfg.small_px, cfg.small_px), Image.LANCZOS)
    write_bytes(out / "b/b_tiny.jpg", jpeg_bytes(tiny, cfg.jpeg_quality))
    defects["too_small"].append("b/b_tiny.jpg")

    # Sidecar captions, which the caption stage prefers over its template.
    write_text(out / "a/a_000.txt", "a photo of an astronaut in a white spacesuit, american flag behind her\n")
    write_text(out / "b/b_000.caption", "a portrait of an older woman in a naval uniform and glasses\n")

    # Drawn last, so the domains' crops and defects do not depend on how many there are.
    for domain, src in sources().items():
        for index in range(cfg.unseen_per_domain):
            write_bytes(out / f"{domain}_unseen/{domain}_unseen_{index:03d}.jpg", jpeg_bytes(random_crop(src, rng, cfg.size_px), cfg.jpeg_quality))

    write_json(out / "defects.json", defects)
    return defects
