"""The denoiser and its conditioning: UNet2DConditionModel, a frozen CLIPTextModel and its CLIPTokenizer.

``build_init`` makes what every phase starts from, either from a local SD-layout folder (``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or from configs (tiny by default), with ``conv_in`` /
``conv_out`` adapted to the codec's latent channels -- what XLsd did to put the SDXL VAE under SD 1.5:
the first ``min(old, new)`` channels keep their weights, new ones start from small random weights
(input) or zero (output), so the adapted model starts close to the original's behaviour.

The tokenizer of a built-from-config text encoder is a real CLIP BPE tokenizer made offline from the
vocabulary open_clip ships (``bpe_simple_vocab_16e6.txt.gz``), identical to openai/clip-vit-large-patch14's.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.cli import StageError
from stagewise.diffusion.config import ModelSpec
from stagewise.train.data import mix_seed

log = logging.getLogger(__name__)
PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")
UNET_FILE, UNET_META = "unet.safetensors", "unet.json"  # runs/<phase>/ (and runs/init/)
TEXT_DIR = "text"  # runs/init/text/: text_encoder/ + tokenizer/ (frozen; every phase reads them)
# SD 1.5's scheduler (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def open_clip_tokenizer(dest: Path, max_length: int = 77):
    """A CLIPTokenizer from open_clip's bundled BPE merges, written to ``dest`` (vocab.json + merges.txt)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(dest)
    return tokenizer


def adapt_channels(unet, channels: int, seed: int = 0):
    """``conv_in`` / ``conv_out`` of ``unet`` resized to ``channels`` latent channels (XLsd's surgery)."""
    old = unet.config.in_channels
    if old == channels and unet.config.out_channels == channels:
        return unet
    gen = torch.Generator().manual_seed(mix_seed(seed, 7))
    with torch.no_grad():
        cin, cout = unet.conv_in, unet.conv_out
        keep = min(old, channels)
        new_in = nn.Conv2d(channels, cin.out_channels, cin.kernel_size, padding=cin.padding)
        weight = torch.randn(new_in.weight.shape, generator=gen) * cin.weight.std()  # new channels: the old weights' spread
        weight[:, :keep] = cin.weight[:, :keep]
        new_in.weight.copy_(weight * min(1.0, old / channels) ** 0.5)  # more inputs: keep the activations' variance
        new_in.bias.copy_(cin.bias)
        new_out = nn.Conv2d(cout.in_channels, channels, cout.kernel_size, padding=cout.padding)
        new_out.weight.zero_()
        new_out.bias.zero_()
        keep = min(cout.out_channels, channels)
        new_out.weight[:keep] = cout.weight[:keep]
        new_out.bias[:keep] = cout.bias[:keep]
    unet.conv_in, unet.conv_out = new_in, new_out
    unet.register_to_config(in_channels=channels, out_channels=channels)
    log.info("UNet conv_in/conv_out adapted from %d to %d latent channels", old, channels)
    return unet


def check_pretrained(folder: Path) -> None:
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if not folder.is_dir():
        raise StageError(f"diffusion.model.pretrained: no folder at {folder} (an SD-layout folder with {', '.join(p + '/' for p in PARTS)})")
    if missing:
        raise StageError(f"diffusion.model.pretrained: {folder} lacks {', '.join(p + '/' for p in missing)} (an SD-layout folder has {', '.join(p + '/' for p in PARTS)})")


def check_cross_attention(unet, text_encoder, key: str = "diffusion.model.unet.cross_attention_dim") -> None:
    width, hidden = unet.config.cross_attention_dim, text_encoder.config.hidden_size
    if width != hidden:
        raise StageError(f"{key}: the UNet's cross-attention width is {width}, the text encoder's hidden size is {hidden}; they must match")


def build_init(spec: ModelSpec, channels: int, text_dest: Path):
    """(unet, scheduler config): the starting UNet for a codec of ``channels`` latent channels; the frozen
    text encoder and tokenizer are saved to ``text_dest`` (text_encoder/, tokenizer/)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if spec.pretrained:
        folder = Path(spec.pretrained).expanduser()
        check_pretrained(folder)
        try:
            unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
            text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
            scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        except (OSError, ValueError, KeyError) as exc:
            raise StageError(f"diffusion.model.pretrained: {folder} does not load: {str(exc).splitlines()[0]}") from None
        check_cross_attention(unet, text_encoder, "diffusion.model.pretrained")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(spec.seed, 5))
            tokenizer = open_clip_tokenizer(text_dest / "tokenizer", spec.text_encoder.max_position_embeddings)
            te = spec.text_encoder
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=te.hidden_size, num_hidden_layers=te.num_hidden_layers,
                                                        num_attention_heads=te.num_attention_heads, intermediate_size=te.intermediate_size,
                                                        max_position_embeddings=te.max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
                                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
            unet_cfg = {"cross_attention_dim": te.hidden_size, **spec.unet, "in_channels": channels, "out_channels": channels}
            try:
                unet = UNet2DConditionModel(**unet_cfg)
            except (TypeError, ValueError) as exc:
                raise StageError(f"diffusion.model.unet: not a UNet2DConditionModel config: {exc}") from None
            scheduler = DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, **SD_SCHEDULER)
        check_cross_attention(unet, text_encoder)
    unet = adapt_channels(unet, channels, spec.seed)
    text_encoder.save_pretrained(text_dest / "text_encoder")
    tokenizer.save_pretrained(text_dest / "tokenizer")
    return unet, dict(scheduler.config)


def unet_from_config(config: dict[str, Any]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@functools.lru_cache(maxsize=2)
def load_text(text_dir: Path, device: torch.device):
    """The frozen text encoder (eval, no grad) and its tokenizer from ``runs/init/text``; cached per process
    (frozen, so phases built in one process can share it; the tokenizer's 49 k-entry vocabulary takes ~2 s)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (text_dir / "text_encoder").is_dir():
        raise StageError(f"{text_dir}: no text_encoder/ (run `dvc repro diffuse_init` first)")
    encoder = CLIPTextModel.from_pretrained(str(text_dir / "text_encoder")).to(device).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(text_dir / "tokenizer"))
    return encoder, tokenizer


@torch.no_grad()
def embed_captions(encoder, tokenizer, captions: list[str], device: torch.device, batch: int = 64) -> torch.Tensor:
    """(N, tokens, hidden) last hidden states, as SD 1.5 conditions on them; the encoder is frozen, so
    each distinct caption is encoded once per phase."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i : i + batch], padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(encoder(ids.to(device)).last_hidden_state.float())
    return torch.cat(out)
