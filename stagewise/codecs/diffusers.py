"""Diffusers autoencoders as codecs: ``AutoencoderKL`` (SD 1.5, the SDXL VAE) or ``AutoencoderTiny`` (TAESD).

``codec.weights`` is a hub id or a local folder (``codec.subfolder: vae`` for a pipeline layout); which
class it is comes from the folder's ``config.json``. Latents are stored raw (the KL posterior's mean, or
the tiny encoder's output); the VAE's own ``scaling_factor`` / ``shift_factor`` become the codec's load-time
``scale`` / ``shift`` (``codec.scale`` / ``codec.shift`` still override them), so the cache never holds a
scaled latent. The codec id names the weights' content hash, so two VAEs never share cached latents.
Diffusers VAEs work in [-1, 1]; this codec takes and returns [0, 1] like every other.
"""

from __future__ import annotations

import json
import logging

import torch

from stagewise import hub
from stagewise.cli import StageError
from stagewise.codecs.base import Codec, CodecConfig

log = logging.getLogger(__name__)
CLASSES = ("AutoencoderKL", "AutoencoderTiny")


class DiffusersCodec(Codec):
    name = "diffusers"

    def __init__(self, cfg: CodecConfig, vae: torch.nn.Module, weights_id: str):
        config = vae.config
        self.default_shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.default_scale = float(getattr(config, "scaling_factor", None) or 1.0)
        super().__init__(cfg)
        self.vae = vae
        self.kind = type(vae).__name__
        self.channels = int(config.latent_channels)
        blocks = config.block_out_channels if self.kind == "AutoencoderKL" else config.encoder_block_out_channels
        self.factor = 2 ** (len(blocks) - 1)
        self.weights_id = weights_id

    @property
    def id(self) -> str:
        return f"diffusers-{self.kind}-{self.weights_id}"

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        x = rgb.to(self.vae.dtype) * 2 - 1
        if self.kind == "AutoencoderKL":
            return self.vae.encode(x).latent_dist.mean.float()  # the mean: a cache entry must not depend on a random draw
        return self.vae.encode(x).latents.float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(latent.to(self.vae.dtype)).sample.float()
        return ((out + 1) / 2).clamp(0, 1)


def load_diffusers_codec(cfg: CodecConfig) -> DiffusersCodec:
    if not cfg.weights:
        raise StageError("codec.weights: codec.name diffusers needs a hub id or a local folder of an AutoencoderKL / AutoencoderTiny (with codec.subfolder: vae for a pipeline folder)")
    root = hub.resolve(cfg.weights, section="codec", key="weights")
    folder = root / cfg.subfolder if cfg.subfolder else root
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = " (a pipeline folder? set codec.subfolder: vae)" if (root / "vae" / "config.json").is_file() and not cfg.subfolder else ""
        raise StageError(f"codec.{'subfolder' if cfg.subfolder else 'weights'}: no config.json in {folder}{hint}")
    kind = json.loads(config_file.read_text()).get("_class_name")
    if kind not in CLASSES:
        raise StageError(f"codec.weights: {folder} holds a {kind!r}, not one of {', '.join(CLASSES)}")
    import diffusers

    vae = hub.load_pretrained(getattr(diffusers, kind), folder, section="codec", key="weights")
    codec = DiffusersCodec(cfg, vae.float(), hub.identity(folder)[:8])
    log.info("codec %s from %s (scale %g, shift %g)", codec.id, folder, codec.scale, codec.shift)
    return codec
