"""The two-domain autoencoder of the DeepFaceLab / faceswap Phaze-A family, grown level by level.

    x (codec latent, C x R x R) -> encoder: input block at R, then down blocks R -> R/2 -> ... -> bottleneck
    -> inter (dense bottleneck; shared, or one per domain: Phaze-A shared_fc / split_fc)
    -> decoder (shared, or one per domain): up blocks bottleneck -> ... -> R, then output block at R

A -> A reconstruction runs A's inter and decoder; the A -> B swap encodes A and decodes with B's
inter / decoder. Every level is keyed by its latent size in px, so parameter names say where a tensor
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
    inter: Literal["shared", "split"] = "shared"  # DFL "DF": one inter, a decoder per domain
    decoders: Literal["shared", "split"] = "split"
    seed: int = 0  # initial weights; growth seeds its new blocks from this and the new size

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.inter == "shared" and self.decoders == "shared":
            raise ValueError("inter and decoders are both 'shared': nothing tells A from B, so there is no swap; make one of them 'split'")
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
    """Features -> codec latent (ProGAN toRGB); linear, since normalised latents are signed."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownBlock(nn.Module):
    """r -> r/2: a 3x3 conv, then a strided 3x3 conv."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_in, 3, padding=1)
        self.conv2 = nn.Conv2d(width_in, width_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.conv2(_act(self.conv1(x))))


class UpBlock(nn.Module):
    """r/2 -> r: nearest 2x upsample, then two 3x3 convs."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_out, 3, padding=1)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return _act(self.conv2(_act(self.conv1(x))))


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

    def forward(self, x: torch.Tensor, fade: float = 1.0) -> torch.Tensor:
        r = self.top_px
        h = self.blocks[str(r)](self.inputs[str(r)](x))
        if fade < 1.0 and r > self.base_px:  # ProGAN fade-in: blend in the parent's input path
            h_old = self.inputs[str(r // 2)](F.avg_pool2d(x, 2))
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
    def __init__(self, cfg: ModelConfig, channels: int, base_px: int, top_px: int):
        super().__init__()
        self.top_px, self.base_px = top_px, base_px
        # blocks[r] produces size r from r/2
        self.blocks = nn.ModuleDict({str(r): UpBlock(cfg.channels_at(r // 2), cfg.channels_at(r)) for r in reversed(_levels(top_px, cfg.bottleneck_px))})
        self.outputs = nn.ModuleDict({str(r): OutputBlock(cfg.channels_at(r), channels) for r in _levels(top_px, base_px // 2)})

    def forward(self, h: torch.Tensor, fade: float = 1.0) -> torch.Tensor:
        top = self.top_px
        for key, block in self.blocks.items():
            if int(key) == top:
                break
            h = block(h)
        y = self.outputs[str(top)](self.blocks[str(top)](h))
        if fade < 1.0 and top > self.base_px:  # ProGAN fade-in: blend in the parent's output path
            y_old = F.interpolate(self.outputs[str(top // 2)](h), scale_factor=2.0, mode="nearest")
            y = torch.lerp(y_old, y, fade)
        return y


class Autoencoder(nn.Module):
    """Encoder -> inter -> decoder at ``latent_px``, with the levels of every size since ``base_px``."""

    def __init__(self, cfg: ModelConfig, channels: int, factor: int, resolution_px: int | None = None):
        super().__init__()
        resolution_px = resolution_px or cfg.resolution_px
        for name, px in (("model.resolution_px", cfg.resolution_px), ("resolution_px", resolution_px)):
            if px % factor or (px // factor) <= cfg.bottleneck_px:
                raise ValueError(f"{name} {px} gives {px / factor:g} latent px with codec factor {factor}; need a multiple of {factor} and more than model.bottleneck_px {cfg.bottleneck_px}")
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
        for name in self.decoder_names():
            self.add_module(name, Decoder(cfg, channels, self.base_px, self.latent_px))

    def inter_names(self) -> list[str]:
        return ["inter"] if self.cfg.inter == "shared" else [f"inter_{d}" for d in DOMAINS]

    def decoder_names(self) -> list[str]:
        return ["decoder"] if self.cfg.decoders == "shared" else [f"decoder_{d}" for d in DOMAINS]

    def _part(self, kind: str, domain: str) -> nn.Module:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; the model has {DOMAINS}")
        shared = (self.cfg.inter if kind == "inter" else self.cfg.decoders) == "shared"
        return getattr(self, kind if shared else f"{kind}_{domain}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, self.fade)

    def decode(self, h: torch.Tensor, domain: str) -> torch.Tensor:
        """Bottleneck features -> a latent in ``domain``'s style (A's features + "b" = the swap)."""
        return self._part("decoder", domain)(self._part("inter", domain)(h), self.fade)

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return self.decode(self.encode(x), domain)

    def new_names(self) -> set[str]:
        """Tensors added by the latest growth (empty at the init resolution)."""
        if self.latent_px == self.base_px:
            return set()
        top = str(self.latent_px)
        prefixes = [f"encoder.inputs.{top}.", f"encoder.blocks.{top}."]
        prefixes += [f"{d}.{part}.{top}." for d in self.decoder_names() for part in ("blocks", "outputs")]
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
