"""Codecs map RGB in [0, 1] (N, 3, H, W) to a latent (N, C, H / factor, W / factor) and back.

The latent cache stores *raw* codec output; ``normalize`` / ``denormalize`` apply the training scale at
load time, so changing ``codec.scale`` never forces a re-encode. ``Codec.id`` names the exact weights,
so latents made by different weights are never mixed.
"""

from __future__ import annotations

import torch

from stagewise.codecs.base import Codec, CodecConfig

__all__ = ["Codec", "CodecConfig", "load_codec"]


def load_codec(cfg: CodecConfig, device: torch.device | str = "cpu") -> Codec:
    """Build the configured codec on ``device`` in eval mode with frozen weights."""
    if cfg.name == "pixels":
        from stagewise.codecs.pixels import PixelCodec

        codec: Codec = PixelCodec(cfg)
    elif cfg.name == "taef2":
        from stagewise.codecs.taef2 import load_taef2

        codec = load_taef2(cfg)
    else:  # unreachable: CodecConfig validates the name
        raise ValueError(f"unknown codec {cfg.name!r}")
    return codec.to(device).eval().requires_grad_(False)
