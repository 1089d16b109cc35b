"""The two-domain autoencoder of the DeepFaceLab / faceswap Phaze-A family, grown level by level.

    x (codec latent, C x R x R) -> encoder: input block at R, then down blocks R -> R/2 -> ... -> bottleneck
    -> inter (dense bottleneck; shared, one per domain: Phaze-A shared_fc / split_fc, or DFL's LIAE)
    -> decoder (shared, or one per domain): up blocks bottleneck -> ... -> R, then output block at R

A -> A reconstruction runs A's inter and decoder; the A -> B swap encodes A and decodes with B's
inter / decoder. ``inter: liae`` is DFL's LIAE: two inters, ``inter_AB`` (both domains) and ``inter_B``,
whose codes are concatenated into one shared decoder: A -> [AB, AB], B -> [B, AB]; DFL's swap (B's face
in A's style) is [AB, AB] of B.

The rest of DFL's archi options: ``decoder_res_blocks`` residual blocks after each up block,
``upsample: pixel_shuffle`` (DFL's Upscale: a conv to 4x channels, then depth-to-space),
``pixel_norm`` (``-u``: the code is pixel-normalised before the inter) and ``half_res`` (``-d``: inter
and decoder run at half the latent size and the output block doubles it by depth-to-space, which
makes the top level 4x cheaper). Every level is keyed by its latent size in px, so parameter names say where a tensor
lives (``encoder.inputs.16.conv.weight``, ``decoder_b.blocks.32.conv1.weight``) and freeze patterns are
natural: ``encoder``, ``inter*``, ``decoder_a``, and ``old`` (see ``old_names``).

Growth (ProGAN): ``grow(model)`` returns the model at twice the resolution: a new input block and down
block in front of the encoder, a new up block and output block behind each decoder, and *every* tensor
of the parent copied unchanged. The parent's input / output blocks stay (unused once the fade-in is
over) so that the parent's state dict is a subset of the child's: nothing is ever dropped, and a
fade-in (``model.fade``, 0 -> 1 over N images) can blend the old path with the new one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from stagewise.config import Section
from stagewise.domains import DOMAINS  # noqa: F401  (the two domains of the swap; re-exported here)


class ModelConfig(Section):
    """Architecture of the init model (params section ``model``). Growth stages derive the rest."""

    resolution_px: int = Field(128, ge=8)  # image size of the init model; the first growth stage doubles it
    bottleneck_px: int = Field(4, ge=1)  # latent px at the dense bottleneck: DFL / Phaze-A use 4 x 4
    # Channels at latent size r: clamp(channel_base // r, channel_min, channel_max), as in ProGAN: the
    # wide low levels hold identity, the narrow high levels detail, so each growth costs about the same.
    channel_base: int = Field(2048, ge=1)
    channel_max: int = Field(128, ge=1)
    channel_min: int = Field(16, ge=1)
    ae_dims: int = Field(256, ge=1)  # width of the dense bottleneck (DFL ae_dims)
    inter: Literal["shared", "split", "liae"] = "shared"  # DFL "DF": one inter, a decoder per domain; liae: inter_AB + inter_B
    decoders: Literal["shared", "split"] = "split"
    decoder_res_blocks: int = Field(0, ge=0)  # residual blocks after each up block (DFL's decoder has 1)
    upsample: Literal["nearest", "pixel_shuffle"] = "nearest"  # pixel_shuffle: DFL's Upscale (conv to 4x, depth-to-space)
    pixel_norm: bool = False  # DFL -u: pixel-normalise the encoder's code before the inter
    half_res: bool = False  # DFL -d: inter and decoder at half the latent size, output doubled by depth-to-space
    seed: int = 0  # initial weights; growth seeds its new blocks from this and the new size

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.inter == "shared" and self.decoders == "shared":
            raise ValueError("inter and decoders are both 'shared': nothing tells A from B, so there is no swap; make one of them 'split'")
        if self.inter == "liae" and self.decoders != "shared":
            raise ValueError("inter 'liae' feeds one decoder from both domains' codes: set decoders: shared")
        for key in ("resolution_px", "bottleneck_px"):
            value = getattr(self, key)
            if value & (value - 1):
                raise ValueError(f"{key} must be a power of two (got {value})")
        if self.channel_min > self.channel_max:
            raise ValueError(f"channel_min {self.channel_min} > channel_max {self.channel_max}")
        return self

    def channels_at(self, latent_px: int) -> int:
        return max(self.channel_min, min(self.channel_max, self.channel_base // latent_px))


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)  # DFL's activation throughout


class InputBlock(nn.Module):
    """Codec latent -> features (ProGAN fromRGB)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.conv(x))


class OutputBlock(nn.Module):
    """Features -> codec latent (ProGAN toRGB); linear, since normalised latents are signed. With
    ``double`` (DFL -d) the features are at half size: 4x the channels, then depth-to-space."""

    def __init__(self, width: int, channels: int, double: bool = False):
        super().__init__()
        self.double = double
        self.conv = nn.Conv2d(width, channels * (4 if double else 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.pixel_shuffle(y, 2) if self.double else y


class DownBlock(nn.Module):
    """r -> r/2: a 3x3 conv, then a strided 3x3 conv."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_in, 3, padding=1)
        self.conv2 = nn.Conv2d(width_in, width_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.conv2(_act(self.conv1(x))))


class ResBlock(nn.Module):
    """DFL's decoder ResidualBlock: two 3x3 convs and a skip, at one size."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(x + self.conv2(_act(self.conv1(x))))


class UpBlock(nn.Module):
    """r/2 -> r: nearest 2x upsample then two 3x3 convs, or (pixel_shuffle) a 3x3 conv to 4x the
    channels, depth-to-space, then a 3x3 conv; then ``res_blocks`` residual blocks."""

    def __init__(self, width_in: int, width_out: int, upsample: str = "nearest", res_blocks: int = 0):
        super().__init__()
        self.shuffle = upsample == "pixel_shuffle"
        self.conv1 = nn.Conv2d(width_in, width_out * (4 if self.shuffle else 1), 3, padding=1)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1)
        self.res = nn.ModuleList(ResBlock(width_out) for _ in range(res_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffle:
            x = F.pixel_shuffle(_act(self.conv1(x)), 2)
        else:
            x = _act(self.conv1(F.interpolate(x, scale_factor=2.0, mode="nearest")))
        x = _act(self.conv2(x))
        for block in self.res:
            x = block(x)
        return x


def _levels(top_px: int, bottom_px: int) -> list[int]:
    """Latent sizes from ``top_px`` halving down to (excluding) ``bottom_px``: [64, 32, 16, 8]."""
    out, r = [], top_px
    while r > bottom_px:
        out.append(r)
        r //= 2
    return out


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int, base_px: int, top_px: int):
        super().__init__()
        self.top_px, self.base_px, self.bottleneck_px = top_px, base_px, cfg.bottleneck_px
        # Input blocks at every size the model has been trained at (the parent's are kept: see module doc).
        self.inputs = nn.ModuleDict({str(r): InputBlock(channels, cfg.channels_at(r)) for r in _levels(top_px, base_px // 2)})
        self.blocks = nn.ModuleDict({str(r): DownBlock(cfg.channels_at(r), cfg.channels_at(r // 2)) for r in _levels(top_px, cfg.bottleneck_px)})

    def forward(self, x: torch.Tensor, fade: float = 1.0, x_half: torch.Tensor | None = None) -> torch.Tensor:
        """``x_half``: the same images at half the size (for a latent codec, their real latents: pooling a
        latent is not the latent of the pooled image); only the fade-in reads it, pooling ``x`` without it."""
        r = self.top_px
        h = self.blocks[str(r)](self.inputs[str(r)](x))
        if fade < 1.0 and r > self.base_px:  # ProGAN fade-in: blend in the parent's input path
            h_old = self.inputs[str(r // 2)](F.avg_pool2d(x, 2) if x_half is None else x_half)
            h = torch.lerp(h_old, h, fade)
        for r in _levels(r // 2, self.bottleneck_px):
            h = self.blocks[str(r)](h)
        return h


class Inter(nn.Module):
    """Dense bottleneck: flatten -> ae_dims -> flatten -> reshape (DFL's inter)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.width, self.px = cfg.channels_at(cfg.bottleneck_px), cfg.bottleneck_px
        flat = self.width * self.px * self.px
        self.dense1 = nn.Linear(flat, cfg.ae_dims)
        self.dense2 = nn.Linear(cfg.ae_dims, flat)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.dense1(h.flatten(1))
        return _act(self.dense2(z)).view(-1, self.width, self.px, self.px)


class Decoder(nn.Module):
    """Up blocks from the bottleneck to the top feature size (the latent size, or half of it with
    ``half_res``), then the output block of the latent size. ``outputs[r]`` makes the latent of size r."""

    def __init__(self, cfg: ModelConfig, channels: int, base_px: int, top_px: int, width_in: int | None = None):
        super().__init__()
        self.top_px, self.base_px = top_px, base_px
        self.shrink = 2 if cfg.half_res else 1  # feature size = latent size // shrink
        feature_top = top_px // self.shrink
        # blocks[r] produces features of size r from r/2; the first takes the inter's code (width_in wide)
        levels = list(reversed(_levels(feature_top, cfg.bottleneck_px)))
        widths = {r: cfg.channels_at(r // 2) for r in levels}
        widths[levels[0]] = width_in or widths[levels[0]]
        self.blocks = nn.ModuleDict({str(r): UpBlock(widths[r], cfg.channels_at(r), cfg.upsample, cfg.decoder_res_blocks) for r in levels})
        self.outputs = nn.ModuleDict({str(r): OutputBlock(cfg.channels_at(r // self.shrink), channels, cfg.half_res) for r in _levels(top_px, base_px // 2)})

    def forward(self, h: torch.Tensor, fade: float = 1.0, with_parent: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The latent at the top size; ``with_parent``: also the parent's output path's latent at half the
        size (during a fade-in), without resampling it."""
        top = self.top_px // self.shrink
        for key, block in self.blocks.items():
            if int(key) == top:
                break
            h = block(h)
        y = self.outputs[str(self.top_px)](self.blocks[str(top)](h))
        y_old = None
        if fade < 1.0 and self.top_px > self.base_px:  # ProGAN fade-in: blend in the parent's output path
            y_old = self.outputs[str(self.top_px // 2)](h)
            if not with_parent:
                y = torch.lerp(F.interpolate(y_old, scale_factor=2.0, mode="nearest"), y, fade)
        return (y, y_old) if with_parent else y


class Autoencoder(nn.Module):
    """Encoder -> inter -> decoder at ``latent_px``, with the levels of every size since ``base_px``."""

    def __init__(self, cfg: ModelConfig, channels: int, factor: int, resolution_px: int | None = None):
        super().__init__()
        resolution_px = resolution_px or cfg.resolution_px
        shrink = 2 if cfg.half_res else 1  # the decoder's features are at latent px / 2 with half_res
        for name, px in (("model.resolution_px", cfg.resolution_px), ("resolution_px", resolution_px)):
            if px % factor or (px // factor // shrink) <= cfg.bottleneck_px:
                need = f"more than {'twice ' if shrink == 2 else ''}model.bottleneck_px {cfg.bottleneck_px}{' (half_res)' if shrink == 2 else ''}"
                raise ValueError(f"{name} {px} gives {px / factor:g} latent px with codec factor {factor}; need a multiple of {factor} and {need}")
        if resolution_px < cfg.resolution_px or resolution_px & (resolution_px - 1):
            raise ValueError(f"resolution_px {resolution_px} must be a power of two >= model.resolution_px {cfg.resolution_px}")
        self.cfg, self.channels, self.factor = cfg, channels, factor
        self.resolution_px = resolution_px
        self.base_px = cfg.resolution_px // factor
        self.latent_px = resolution_px // factor
        # 1.0 = the new level alone; the loop lowers it during a growth stage's fade-in. A plain attribute:
        # a pure function of progress, recomputed every step, so it is never part of saved state.
        self.fade = 1.0
        self.encoder = Encoder(cfg, channels, self.base_px, self.latent_px)
        for name in self.inter_names():
            self.add_module(name, Inter(cfg))
        code_width = cfg.channels_at(cfg.bottleneck_px) * (2 if cfg.inter == "liae" else 1)  # LIAE: two codes side by side
        for name in self.decoder_names():
            self.add_module(name, Decoder(cfg, channels, self.base_px, self.latent_px, code_width))

    def inter_names(self) -> list[str]:
        if self.cfg.inter == "liae":
            return ["inter_AB", "inter_B"]
        return ["inter"] if self.cfg.inter == "shared" else [f"inter_{d}" for d in DOMAINS]

    def decoder_names(self) -> list[str]:
        return ["decoder"] if self.cfg.decoders == "shared" else [f"decoder_{d}" for d in DOMAINS]

    def _part(self, kind: str, domain: str) -> nn.Module:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; the model has {DOMAINS}")
        if kind == "inter" and self.cfg.inter == "liae":
            raise ValueError("a LIAE model has no per-domain inter; use Autoencoder.code")
        shared = (self.cfg.inter if kind == "inter" else self.cfg.decoders) == "shared"
        return getattr(self, kind if shared else f"{kind}_{domain}")

    def encode(self, x: torch.Tensor, x_half: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(x, self.fade, x_half)
        if self.cfg.pixel_norm:  # DFL -u: the flattened code at unit RMS
            h = h * torch.rsqrt(h.square().flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-6)
        return h

    def code(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        """The inter's output the decoder reads: LIAE's [AB, AB] for A and [B, AB] for B."""
        if self.cfg.inter == "liae":
            shared = self.inter_AB(h)
            return torch.cat([shared if domain == "a" else self.inter_B(h), shared], dim=1)
        return self._part("inter", domain)(h)

    def decode(self, h: torch.Tensor, domain: str, with_parent: bool = False):
        """Bottleneck features -> a latent in ``domain``'s style (A's features + "b" = the swap).
        ``with_parent``: (latent, the parent level's latent at half size or None), for a fade-in loss."""
        return self._part("decoder", domain)(self.code(h, domain), self.fade, with_parent)

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return self._part("decoder", domain)(self.code(self.encode(x), domain), self.fade)

    def new_names(self) -> set[str]:
        """Tensors added by the latest growth (empty at the init resolution)."""
        if self.latent_px == self.base_px:
            return set()
        top, feature_top = self.latent_px, self.latent_px // (2 if self.cfg.half_res else 1)
        prefixes = [f"encoder.inputs.{top}.", f"encoder.blocks.{top}."]
        prefixes += [f"{d}.blocks.{feature_top}." for d in self.decoder_names()] + [f"{d}.outputs.{top}." for d in self.decoder_names()]
        return {name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))}

    def old_names(self) -> set[str]:
        """``old``: every tensor that existed before the latest growth (in a growth stage: before this
        stage). Empty at the init resolution, where nothing has been grown yet."""
        if self.latent_px == self.base_px:
            return set()
        return {name for name, _ in self.named_parameters()} - self.new_names()

    def describe(self) -> dict:
        """What meta.json records to rebuild this architecture (with the codec's channels and factor)."""
        return {"model": self.cfg.model_dump(mode="json"), "channels": self.channels, "factor": self.factor, "resolution_px": self.resolution_px}


def build(description: dict, device: torch.device | str = "cpu") -> Autoencoder:
    """The (randomly initialised) model that ``Autoencoder.describe()`` describes."""
    cfg = ModelConfig.model_validate(description["model"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(cfg.seed, description["resolution_px"]))
        model = Autoencoder(cfg, description["channels"], description["factor"], description["resolution_px"])
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # He init for leaky ReLU keeps the signal's scale through the deep, norm-free stack; PyTorch's
                # default shrinks it per layer, and in a short CPU run the loss then falls about 1.4x slower.
                nn.init.kaiming_normal_(module.weight, a=0.2)
                nn.init.zeros_(module.bias)
    return model.to(device)


def init_model(cfg: ModelConfig, channels: int, factor: int) -> Autoencoder:
    """The init model: fresh weights, seeded by ``cfg.seed``."""
    return build({"model": cfg.model_dump(mode="json"), "channels": channels, "factor": factor, "resolution_px": cfg.resolution_px})


def grow(model: Autoencoder, fade: float = 1.0) -> Autoencoder:
    """The model at twice the resolution: new blocks seeded from (seed, new size), every parent tensor copied."""
    description = {**model.describe(), "resolution_px": model.resolution_px * 2}
    device = next(model.parameters()).device
    child = build(description, device)
    parent_state = model.state_dict()
    missing = set(parent_state) - set(child.state_dict())
    if missing:  # would be a bug in this module: growth must never drop a tensor
        raise RuntimeError(f"grown model lacks parent tensors: {sorted(missing)[:5]}")
    child.load_state_dict(parent_state, strict=False)
    child.fade = fade
    return child


def _seed(seed: int, resolution_px: int) -> int:
    # Distinct, reproducible streams per size: growing to 256 px draws the same new blocks every time.
    return seed * 1_000_003 + int(math.log2(resolution_px))
