"""A patch discriminator for NCHW inputs of any channel count and the adversarial losses.

Public interface::

    GanConfig(Section)                               # width, layers, spectral_norm, loss, lr, betas, eps
    make_discriminator(channels, cfg) -> PatchDiscriminator   # (N, C, H, W) -> logits (N, 1, H/2^layers, W/2^layers)
    d_loss(real_logits, fake_logits, kind="hinge") -> Tensor
    g_loss(fake_logits, kind="hinge") -> Tensor      # the loop multiplies it by the stage's gan_power
    frozen(disc)                                     # context: D's requires_grad off, restored after

Use in the loop (generator = the autoencoder; D has its own optimizer, ``state.make_optimizer``)::

    loss_d = d_loss(disc(target), disc(pred.detach()), cfg.loss)   # reaches D only
    with frozen(disc):
        loss_g = g_loss(disc(pred), cfg.loss)                       # reaches G only
    loss = recon + gan_power * loss_g + loss_d                      # one backward, both optimizers step

PatchGAN (Isola et al. 2017): each output logit judges one receptive-field patch, so the discriminator
works on any image size >= 2**layers, on 3-channel pixels and 32-channel latents alike. No batch norm
(the averaged statistics would mix real and fake batches); spectral norm (Miyato et al. 2018) keeps D
Lipschitz instead, which keeps small-batch GAN training stable. Its state_dict holds only tensors
(spectral norm's ``original``, ``_u``, ``_v``), so it can be saved as safetensors.

Losses, both written with ``softplus`` / ``relu`` so they are stable for large logits:
- ``hinge``: D: mean(relu(1 - real)) + mean(relu(1 + fake)); G: -mean(fake)  (SAGAN, BigGAN)
- ``nonsat``: D: mean(softplus(-real)) + mean(softplus(fake)); G: mean(softplus(-fake))  (Goodfellow 2014)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from stagewise.config import Section

LossKind = Literal["hinge", "nonsat"]
_LEAKY_SLOPE = 0.2  # the PatchGAN / DCGAN value


class GanConfig(Section):
    width: int = Field(32, gt=0)  # channels of the first conv; DFL's gan_dims is 16, 32 keeps D small on CPU
    layers: int = Field(3, ge=1, le=8)  # stride-2 convs: 3 gives 70x70-px-like patches (pix2pix's PatchGAN)
    spectral_norm: bool = True  # stabilises D without batch norm
    loss: LossKind = "hinge"  # hinge saturates less than the non-saturating loss with small batches
    lr: float = Field(2e-4, gt=0)  # pix2pix / DCGAN discriminator learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # beta1 0.5: the usual GAN setting, less momentum lag
    eps: float = Field(1e-8, gt=0)


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int, width: int = 32, layers: int = 3, spectral_norm: bool = True):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"discriminator channels must be > 0, got {channels}")
        self.layers = layers
        wrap = _spectral_norm if spectral_norm else (lambda m: m)
        blocks: list[nn.Module] = []
        c_in = channels
        for i in range(layers):
            c_out = width * min(2**i, 8)  # double per level, capped (pix2pix caps at 8x)
            blocks += [wrap(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(_LEAKY_SLOPE)]
            c_in = c_out
        blocks.append(wrap(nn.Conv2d(c_in, 1, 3, stride=1, padding=1)))  # one logit per patch
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2**self.layers:
            raise ValueError(
                f"discriminator with {self.layers} stride-2 layers needs inputs of at least {2**self.layers} px, "
                f"got {tuple(x.shape[-2:])}: lower gan.layers"
            )
        return self.net(x)


def make_discriminator(channels: int, cfg: GanConfig | None = None) -> PatchDiscriminator:
    cfg = cfg or GanConfig()
    return PatchDiscriminator(channels, cfg.width, cfg.layers, cfg.spectral_norm)


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: LossKind = "hinge") -> torch.Tensor:
    """The discriminator's loss: low when real logits are high and fake logits low."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "nonsat":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; use 'hinge' or 'nonsat'")


def g_loss(fake_logits: torch.Tensor, kind: LossKind = "hinge") -> torch.Tensor:
    """The generator's adversarial loss: low when the discriminator calls its output real."""
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "nonsat":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; use 'hinge' or 'nonsat'")


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with requires_grad off inside the block (so G's backward leaves D's grads alone)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
