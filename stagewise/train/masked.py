"""DFL's masked training and eyes/mouth priority, on any codec (masks at latent size, from the cache).

The cache stores each face crop's masks at latent resolution (uint8 (2, h, w): face hull, eyes + mouth;
``stagewise.cache.latent_masks``). DeepFaceLab's SAEHD semantics:

- ``masked_training``: the face mask is blurred (gaussian, radius max(1, size // 32)), clipped at 0.5 and
  doubled, so it is 1 inside the face, 0 beyond the blurred edge and soft in between; prediction and
  target are both multiplied by it before every reconstruction loss. Outside the blurred edge the loss
  does not see the target at all (its gradient there is exactly zero): the background is not learned.
- ``eyes_mouth_prio``: adds ``EYES_MOUTH_WEIGHT`` x mean |target * em - pred * em| over the (unblurred)
  eyes and mouth mask, DFL's ``300 * abs(...)`` beside its ``10 * square(...)`` reconstruction term: 30x
  the scale of our weight-1 MSE.

On a latent codec "inside the mask" means the latent pixels the downsampled mask covers: a TAEF2 latent
pixel is an 8 x 8 patch, so the edge is a patch wide and the blur is counted in latent pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stagewise.train.losses import LossWeights, reconstruction_loss

EYES_MOUTH_WEIGHT = 30.0  # DFL: 300 * L1 against 10 * MSE


def gaussian_blur(x: torch.Tensor, radius: float) -> torch.Tensor:
    """DFL's nn.gaussian_blur: sigma = radius, kernel max(3, 4 sigma) rounded up to odd, zero padding."""
    size = max(3, int(4 * radius))
    size += 1 - size % 2
    coords = torch.arange(size, dtype=torch.float32, device=x.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * radius**2))
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), padding=(0, size // 2), groups=c)
    return F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), padding=(size // 2, 0), groups=c)


def training_mask(face: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) face mask in [0, 1] -> DFL's blurred training mask (1 inside, 0 past the soft edge)."""
    blurred = gaussian_blur(face.float(), max(1, face.shape[-1] // 32))
    return blurred.clamp(0, 0.5) * 2


def masked_reconstruction(
    pred: torch.Tensor,
    target: torch.Tensor,
    masks: torch.Tensor | None,
    weights: LossWeights,
    masked_training: bool,
    eyes_mouth_prio: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``reconstruction_loss`` with DFL's face masks applied; ``masks`` (N, 2, h, w) in [0, 1] or None."""
    if masks is None or not (masked_training or eyes_mouth_prio):
        return reconstruction_loss(pred, target, weights)
    if masked_training:
        face = training_mask(masks[:, :1]).to(pred.dtype)
        total, parts = reconstruction_loss(pred * face, target * face, weights)
    else:
        total, parts = reconstruction_loss(pred, target, weights)
    if eyes_mouth_prio:
        em = masks[:, 1:2].to(pred.dtype)
        prio = (target.float() * em - pred.float() * em).abs().mean()
        parts = {**parts, "eyes_mouth": prio.detach()}
        total = total + EYES_MOUTH_WEIGHT * prio
    return total, parts


def flip_with_masks(flip, target: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator):
    """Mirror target and masks with the same random draw (``flip`` is warp.random_flip)."""
    if masks is None:
        return flip(target, generator), None
    both = flip(torch.cat([target, masks.to(target.dtype)], 1), generator)
    return both.split([target.shape[1], masks.shape[1]], 1)
