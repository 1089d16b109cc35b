"""preview.png: for a few images per domain, A | A->A | A->B over B | B->B | B->A, decoded to pixels.

Every cell is decoded through the codec (the sources too: what the model sees is the cached latent, so
the first column shows that latent decoded, not the original file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from stagewise.codecs import Codec
from stagewise.io import write_bytes
from stagewise.models.autoencoder import DOMAINS, Autoencoder

DECODE_CHUNK = 4  # images per codec.decode call: bounds memory at 512 px


@torch.no_grad()
def to_pixels(codec: Codec, normalized: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> RGB in [0, 1] on the CPU, decoded in chunks."""
    out = [codec.decode(codec.denormalize(chunk.float())).clamp(0, 1).cpu() for chunk in normalized.split(DECODE_CHUNK)]
    return torch.cat(out)


@torch.no_grad()
def preview_grid(model: Autoencoder, codec: Codec, sources: dict[str, torch.Tensor]) -> Image.Image:
    """``sources``: normalised latents per domain (the same count for each)."""
    was_training = model.training
    model.eval()
    try:
        cells = []  # rows of [source, same-domain reconstruction, swap]
        for domain, other in (DOMAINS, DOMAINS[::-1]):
            x = sources[domain]
            h = model.encode(x)
            cells.append(torch.stack([x, model.decode(h, domain), model.decode(h, other)], dim=1))
    finally:
        model.train(was_training)
    grid = torch.cat(cells)  # (rows, 3, C, h, w)
    rows, cols = grid.shape[:2]
    pixels = to_pixels(codec, grid.flatten(0, 1))
    size = pixels.shape[-1]
    # Titles readable at any size: a 512 px preview opened to fit a screen shrinks ~3x.
    header_px = max(18, size // 10)
    canvas = Image.new("RGB", (cols * size, header_px + rows * size), "white")
    images = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(img), (c * size, header_px + r * size))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=round(header_px * 0.7))  # Pillow's bundled font: no system fonts needed
    for c, title in enumerate(("A / B", "A->A / B->B", "A->B / B->A")):
        draw.text((c * size + header_px // 4, header_px // 2), title, fill="black", font=font, anchor="lm")
    return canvas


def write_preview(path: Path, model: Autoencoder, codec: Codec, sources: dict[str, torch.Tensor]) -> None:
    import io

    buf = io.BytesIO()
    preview_grid(model, codec, sources).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
