"""DFL's augmentation semantics: one random affine for input *and* target, the smooth warp on the input only.

Public interface::

    draw(n, generator, cfg, warp_input) -> Draw        # the batch's random numbers, drawn once
    Draw.grids(h, w) -> (target_grid, source_grid)     # ``grid_sample`` grids at any size (None: identity)
    augment(x, generator, cfg, warp_input, x_half=None) -> Augmented   # source, target (+ their halves)

DeepFaceLab (``gen_warp_params`` / ``warp_by_params``) draws per sample one affine transform (rotation,
scale, translation; the flip is the cache's mirrored rows here) and applies it to the target and the input
alike, so the model sees rotated faces but never learns to undo a rotation; the smooth random field goes
on top of the input only, so the model cannot copy pixels through. ``random_warp: false`` keeps the shared
affine (``warp.affine: false`` turns it off too). Both grids come from the same numbers: the input's is the
target's plus the field, so the input is sampled once from the original (no double interpolation).

Sizes: the numbers are drawn once per batch and the grids are built for any (h, w), so a growth stage's
fade-in applies the *same* transform to the real latents of the half-size images (``x_half``).

On a latent codec (taef2) the grids resample the latent grid: an approximation of the latent of the
transformed image (small rotations, shifts and zooms of a smooth latent; never a mirror, which the cache
stores exactly). The quality benchmark measured it against pixel-space variants: see the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stagewise.train.warp import _FIELD_PX, WarpConfig, _check_generator, _uniform


@dataclass
class Draw:
    """One batch's random augmentation: the affine part (None: off) and the input's smooth field (None: off)."""

    linear: torch.Tensor | None  # (N, 2, 2) rotation / zoom
    shift: torch.Tensor | None  # (N, 2) in normalised units
    fields: list[tuple[torch.Tensor, torch.Tensor]]  # per cell count: (coarse offsets (N, 2, c+1, c+1), one-hot (N,))

    def grids(self, h: int, w: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(target grid, input grid), each (N, H, W, 2) or None for the identity."""
        if self.linear is None and not self.fields:
            return None, None
        ref = self.linear if self.linear is not None else self.fields[0][0]
        n, device = ref.shape[0], ref.device
        # Built at most _FIELD_PX square at the final pixel centres, then bilinearly upsampled (as warp_grid)
        mh, mw = min(h, _FIELD_PX), min(w, _FIELD_PX)
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, mh, device=device)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, mw, device=device)
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0).expand(n, -1, -1, -1)  # (N, 2, mh, mw)
        if self.linear is not None:
            target = torch.einsum("nij,njhw->nihw", self.linear, base) + self.shift.view(n, 2, 1, 1)
        else:
            target = base
        source = target
        for coarse, mask in self.fields:
            smooth = F.interpolate(coarse, size=(mh, mw), mode="bicubic", align_corners=True)
            source = source + smooth * mask.view(n, 1, 1, 1)

        def full(grid: torch.Tensor) -> torch.Tensor:
            if (mh, mw) != (h, w):
                grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
            return grid.permute(0, 2, 3, 1)

        return (full(target) if self.linear is not None else None), (full(source) if self.fields or self.linear is not None else None)


def draw(n: int, generator: torch.Generator, cfg: WarpConfig, warp_input: bool, device: torch.device) -> Draw:
    """The random numbers of one batch, on ``device`` (the generator's), no host round trip."""
    device = torch.device(device)
    _check_generator(generator, device)
    linear = shift = None
    if cfg.affine:
        angle = _uniform((n,), generator, device, math.radians(cfg.rotation_deg))
        zoom = 1 + _uniform((n,), generator, device, cfg.scale)
        shift = _uniform((n, 2), generator, device, 2 * cfg.translation)  # [-1, 1] spans the image: 2 units
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        linear = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    fields = []
    if warp_input:
        choice = torch.randint(len(cfg.grid_cells), (n,), generator=generator, device=device)
        for index, cells in enumerate(cfg.grid_cells):
            coarse = torch.randn((n, 2, cells + 1, cells + 1), generator=generator, device=device) * (cfg.strength * 2.0 / cells)
            coarse = F.pad(coarse[:, :, 1:-1, 1:-1], (1, 1, 1, 1))  # border control points stay put
            if linear is not None:  # the field moves the input in the target's (rotated) frame: L f
                coarse = torch.einsum("nij,njhw->nihw", linear, coarse)
            fields.append((coarse, choice == index))
    return Draw(linear, shift, fields)


@dataclass
class Augmented:
    source: torch.Tensor  # the model's input: shared affine + smooth field
    target: torch.Tensor  # the loss's target: the shared affine alone
    source_half: torch.Tensor | None = None  # the same transforms of the half-size images (fade-in)
    target_half: torch.Tensor | None = None


def _sample(x: torch.Tensor, grid: torch.Tensor | None, padding: str) -> torch.Tensor:
    if grid is None:
        return x
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding, align_corners=False)


def augment(x: torch.Tensor, generator: torch.Generator, cfg: WarpConfig, warp_input: bool, x_half: torch.Tensor | None = None) -> Augmented:
    """Input and target of one batch ``x`` (N, C, H, W): the target is ``x`` under the shared affine, the
    input is ``x`` under the shared affine and the smooth field; ``x_half`` (the same images at half the
    size) gets the same transforms."""
    if x.dim() != 4:
        raise ValueError(f"augment expects an NCHW tensor, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    d = draw(n, generator, cfg, warp_input, x.device)
    target_grid, source_grid = d.grids(h, w)
    out = Augmented(_sample(x, source_grid, cfg.padding), _sample(x, target_grid, cfg.padding))
    if x_half is not None:
        target_grid, source_grid = d.grids(*x_half.shape[-2:])
        out.source_half, out.target_half = _sample(x_half, source_grid, cfg.padding), _sample(x_half, target_grid, cfg.padding)
    return out
