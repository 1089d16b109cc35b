"""Tiny diffusion fixtures: a latent cache encoded by a real codec, tiny random VAEs and an SD-layout folder
built from configs and saved with save_pretrained (loaded back through from_pretrained), and params for a
phase that runs in seconds. Nothing downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from stagewise.codecs import Codec
from stagewise.latents import ShardWriter, to_bytes

CAPTIONS = {"a": ["a photo of a woman", "a photo of a woman smiling", "a photo of a girl"], "b": ["a photo of a man", "a photo of a man outdoors", "a photo of a boy"]}
TINY_PHASE = {"batch_size": 4, "log_every_kimg": 0.008, "save_every_kimg": 0.016, "holdout_per_domain": 1, "lr": 1e-3,
              "validation": {"rows": 2, "timesteps": [100, 500, 900], "noise_seeds": 1}, "samples": {"prompts": ["a photo of a woman"], "seeds": [0], "steps": 2}}
TINY_UNET = dict(block_out_channels=[16, 32], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4, norm_num_groups=8)
TINY_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)


def write_cache(root: Path, codec: Codec, resolution_px: int = 32, flip: bool = True, captions: dict[str, list[str]] | None = None) -> Path:
    """Smooth random images encoded by ``codec`` at ``resolution_px``, three per domain, with captions."""
    out = root / str(resolution_px)
    writer = ShardWriter(out)
    gen = torch.Generator().manual_seed(0)
    for domain, texts in (captions or CAPTIONS).items():
        for i, caption in enumerate(texts):
            image = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(resolution_px, resolution_px), mode="bilinear", align_corners=False)
            sha = hashlib.sha256(f"{domain}{i}".encode()).hexdigest()
            for flipped in (False, True) if flip else (False,):
                with torch.no_grad():
                    latent = codec.encode(image.flip(-1) if flipped else image)[0]
                writer.add(sha256=sha, domain=domain, resolution=resolution_px, codec_id=codec.id, shape=list(latent.shape), latent=to_bytes(latent),
                           flipped=flipped, caption=caption, fingerprint="test")
    writer.flush()
    return out


def params(phases: dict, codec: dict | None = None, model: dict | None = None) -> dict:
    return {"codec": codec or {"name": "taef2"}, "diffusion": {"model": model or {"unet": TINY_UNET, "text_encoder": TINY_TEXT}, "defaults": TINY_PHASE, "stages": phases}}


def write_params(folder: Path, phases: dict, **kwargs) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params(phases, **kwargs), sort_keys=False))
    return path


def tiny_vae(dest: Path, kind: str = "AutoencoderKL", latent_channels: int = 4, scaling_factor: float = 0.5, shift_factor: float | None = None) -> Path:
    """A random AutoencoderKL (factor 2) or AutoencoderTiny saved with save_pretrained."""
    import diffusers

    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                      latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, scaling_factor=scaling_factor, shift_factor=shift_factor)
    else:
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1], num_decoder_blocks=[1, 1],
                                        latent_channels=latent_channels, scaling_factor=scaling_factor)
    vae.save_pretrained(dest)
    return dest


def tiny_sd_folder(dest: Path, cross_attention_dim: int = 16, in_channels: int = 4) -> Path:
    """An SD-layout folder (unet/, text_encoder/, tokenizer/, scheduler/) of tiny random parts."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stagewise.diffusion.model import SD_SCHEDULER, open_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = open_clip_tokenizer(dest / "tokenizer", TINY_TEXT["max_position_embeddings"])
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT)).save_pretrained(dest / "text_encoder")
    UNet2DConditionModel(**TINY_UNET, cross_attention_dim=cross_attention_dim, in_channels=in_channels, out_channels=in_channels).save_pretrained(dest / "unet")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(dest / "scheduler")
    return dest
