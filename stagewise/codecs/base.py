"""The codec interface and its config, apart from the package so the codecs can import them without
importing the package that loads them (``stagewise.codecs.load_codec``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stagewise.config import Section


class CodecConfig(Section):
    name: Literal["pixels", "taef2", "diffusers"] = "taef2"  # taef2: 8x smaller latents, so 512 px trains like 64 px
    # taef2: folder with its weight files (None searches the default places); diffusers: hub id or folder
    weights: str | None = Field(None, description="folder with the codec's weight files; None searches the default places")
    subfolder: str | None = None  # diffusers: the VAE's folder inside a pipeline layout, e.g. vae
    # Training sees (raw - shift) * scale. None takes the codec's own default (about zero mean, unit spread).
    shift: float | None = None
    scale: float | None = Field(None, gt=0)


class Codec(torch.nn.Module):
    name: str = "codec"
    channels: int = 3
    factor: int = 1
    default_shift: float = 0.0
    default_scale: float = 1.0
    # Whether mirroring a latent is the latent of the mirrored image (true for pixels only: a mirrored TAEF2
    # latent decodes to ~16-22 dB). Without it, flips must come from the cache's mirrored rows.
    mirror_is_exact: bool = False

    def __init__(self, cfg: CodecConfig | None = None):
        super().__init__()
        cfg = cfg or CodecConfig(name=self.name)  # type: ignore[arg-type]
        self.shift = cfg.shift if cfg.shift is not None else self.default_shift
        self.scale = cfg.scale if cfg.scale is not None else self.default_scale

    @property
    def id(self) -> str:
        """Identifies the exact transform (name plus a weights hash); stored with every latent."""
        return self.name

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) * self.scale

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized / self.scale + self.shift

    def latent_px(self, image_px: int) -> int:
        if image_px % self.factor:
            raise ValueError(f"{self.name}: image size {image_px} px is not a multiple of the codec factor {self.factor}")
        return image_px // self.factor
