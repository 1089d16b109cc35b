"""The identity codec: 3 channels at full resolution. Needs no weights; the trainer's reference case."""

from __future__ import annotations

import torch

from stagewise.codecs.base import Codec


class PixelCodec(Codec):
    name = "pixels"
    channels = 3
    factor = 1
    mirror_is_exact = True
    default_shift = 0.5  # [0, 1] -> [-1, 1], the range the decoder's output layer is initialised for
    default_scale = 2.0

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.clamp(0, 1)
