"""DeepFaceLab-style random warp and flip, batched on the tensor's own device.

Public interface::

    WarpConfig(Section)            # rotation_deg, scale, translation, grid_cells, strength, padding
    random_warp(x, generator, cfg=WarpConfig()) -> Tensor       # warped copy of x (N, C, H, W)
    warp_grid(n, h, w, generator, cfg, device) -> Tensor        # the sampling grid (N, H, W, 2)
    random_flip(x, generator, p=0.5) -> Tensor                  # mirror a random subset of images

``random_warp`` warps its input by a smooth random field plus an affine jitter. The training loop uses
``augment.augment`` instead, DFL's semantics: the affine part is shared by input and target, the field
is the input's alone (``gen_warp_params`` / ``warp_by_params``).

The smooth field: a coarse grid of ``cells + 1`` x ``cells + 1`` control points per image (``cells``
drawn per image from ``grid_cells``, as DFL draws its cell size from w/2, w/4, w/8), interior points
moved by gaussian offsets of ``strength`` x cell size, border points fixed; upsampled bicubically to full
resolution. The affine jitter (rotation, scale, translation about the centre) is per image.

Everything — random numbers included — is created on ``x.device`` with ``generator`` (which must live
on that device): no host round trip, no per-image Python loop. Deterministic for a given generator state.

On codec latents (taef2) this warps the latent grid rather than the pixels; a flipped latent is close to,
but not exactly, the latent of the flipped image (the cache stores exact flipped rows where it matters).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from stagewise.config import Section


class WarpConfig(Section):
    rotation_deg: float = Field(10.0, ge=0, le=180)  # DFL rotation_range [-10, 10] degrees
    scale: float = Field(0.05, ge=0, lt=1)  # DFL scale_range [-0.05, 0.05]: zoom 0.95..1.05
    translation: float = Field(0.05, ge=0, le=1)  # DFL tx/ty_range [-0.05, 0.05] of the image size
    # DFL picks the warp cell size from w/2, w/4, w/8 per sample: 2, 4 or 8 cells per side.
    grid_cells: tuple[int, ...] = Field((2, 4, 8), min_length=1)
    strength: float = Field(0.24, ge=0)  # DFL: control-point offsets ~ N(0, (0.24 * cell size)^2)
    # DFL warps with cv2.BORDER_REPLICATE: stretched edges, no black corners for the model to learn.
    padding: Literal["border", "reflection", "zeros"] = "border"
    # DFL applies the rotation / scale / translation to input and target alike (augment.py), with or
    # without random_warp; false: no affine at all (the smooth field alone, on the input).
    affine: bool = True


# Resolution at which the warp grid is built (see warp_grid): the finest warp cell is 1/8 of the image,
# so 64 samples give 8 per cell.
_FIELD_PX = 64


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    if generator.device.type != device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the tensor on {device}: create it with "
            f"torch.Generator(device=tensor.device) so random numbers never cross the host boundary"
        )


def _uniform(shape, generator, device, half_width: float) -> torch.Tensor:
    """U(-half_width, half_width) on ``device``."""
    return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * half_width


def warp_grid(n: int, h: int, w: int, generator: torch.Generator, cfg: WarpConfig, device: torch.device) -> torch.Tensor:
    """The (N, H, W, 2) ``grid_sample`` grid (x, y in [-1, 1], ``align_corners=False`` convention) of a
    random warp; the identity grid when all strengths are 0."""
    device = torch.device(device)
    _check_generator(generator, device)
    # The grid is built at most _FIELD_PX x _FIELD_PX, at the positions of evenly spaced final pixel
    # centres (first to last), then bilinearly upsampled with align_corners=True: exact for the affine part
    # (it is linear) and for the field smooth to well below a pixel, at a fraction of full-size bicubic cost.
    mh, mw = min(h, _FIELD_PX), min(w, _FIELD_PX)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, mh, device=device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, mw, device=device)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0)  # (2, mh, mw): x then y

    # Affine part: p -> R(angle) p / zoom + shift, about the image centre, in normalised coordinates.
    angle = _uniform((n,), generator, device, math.radians(cfg.rotation_deg))
    zoom = 1 + _uniform((n,), generator, device, cfg.scale)
    shift = _uniform((n, 2), generator, device, 2 * cfg.translation)  # [-1, 1] spans the image: 2 units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    linear = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (N, 2, 2)
    grid = torch.einsum("nij,jhw->nihw", linear, base) + shift.view(n, 2, 1, 1)

    # Smooth part: per image one of the cell counts; each option's field is built for the whole batch
    # and the image's own choice is kept by a one-hot mask (no data-dependent indexing, no sync).
    options = cfg.grid_cells
    choice = torch.randint(len(options), (n,), generator=generator, device=device)
    for index, cells in enumerate(options):
        cell_size = 2.0 / cells  # in normalised units
        coarse = torch.randn((n, 2, cells + 1, cells + 1), generator=generator, device=device)
        coarse = coarse * (cfg.strength * cell_size)
        coarse = F.pad(coarse[:, :, 1:-1, 1:-1], (1, 1, 1, 1))  # border control points stay put
        smooth = F.interpolate(coarse, size=(mh, mw), mode="bicubic", align_corners=True)
        grid = grid + smooth * (choice == index).view(n, 1, 1, 1)
    if (mh, mw) != (h, w):
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)


def random_warp(x: torch.Tensor, generator: torch.Generator, cfg: WarpConfig | None = None) -> torch.Tensor:
    """A randomly warped copy of the NCHW batch ``x`` (the model's input; never warp the target)."""
    cfg = cfg or WarpConfig()
    if x.dim() != 4:
        raise ValueError(f"random_warp expects an NCHW tensor, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    grid = warp_grid(n, h, w, generator, cfg, x.device).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=cfg.padding, align_corners=False)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of ``x`` left-right with probability ``p`` (apply before warping, so that input
    and target are flipped together)."""
    _check_generator(generator, x.device)
    flip = torch.rand((x.shape[0],), generator=generator, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
