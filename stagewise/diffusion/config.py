"""params.yaml ``diffusion``: the model to start from, and the ordered recipe of phases.

    diffusion:
      device: auto
      model: {pretrained: null, unet: {...}, text_encoder: {...}}   # diffuse_init
      defaults: {batch_size: 8, ...}                                 # merged under every phase
      stages:
        p256: {parent: init, resolution_px: 256, length_kimg: 0.2}
        p512: {parent: p256, resolution_px: 512, length_kimg: 0.2}

Phases run in the order written and each names its parent (``init`` or an earlier phase); ``parent`` and
``resolution_px`` are written in the phase itself because dvc.yaml builds its paths from them. Every
error names the key: ``params.yaml: diffusion.stages.p512.lr: ...``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from stagewise.config import ParamsError, Section, parse_section, read_params
from stagewise.train.recipe import INIT, STAGE_NAME, GuardConfig, _deep_merge


class TextEncoderSpec(Section):
    """A CLIPTextModel built from a config (when no pretrained folder is given)."""

    hidden_size: int = Field(32, ge=8)  # SD 1.5: 768
    num_hidden_layers: int = Field(2, ge=1)  # SD 1.5: 12
    num_attention_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=8)
    max_position_embeddings: int = Field(77, ge=8)  # the tokenizer pads / truncates captions to this


class ModelSpec(Section):
    """What ``diffuse_init`` starts from: an SD-layout folder, or a UNet + text encoder built from configs."""

    pretrained: str | None = None  # folder with unet/, text_encoder/, tokenizer/, scheduler/ (SD 1.5 layout)
    # UNet2DConditionModel config keys (built from them when pretrained is null); in/out channels follow
    # the codec. Tiny defaults: a CPU demo, not a model worth sampling.
    unet: dict[str, Any] = Field(
        default_factory=lambda: dict(
            block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=8, norm_num_groups=16,
        )
    )
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    num_train_timesteps: int = Field(1000, ge=10)  # DDPMScheduler, when built (SD 1.5's scaled_linear betas)
    seed: int = 0  # initial weights of whatever is built from a config


class SubsetConfig(Section):
    """Rows chosen by caption regex and/or domain; the phase trains on the union of its subsets."""

    caption_regex: str | None = None  # re.search on the row's caption
    domain: str | None = None
    # EveryDream's multiplier / kohya's repeats: each row appears this many times per epoch; a fraction is
    # the chance of one more appearance (drawn per epoch from the seed), so 0.5 = half the rows each epoch.
    repeats: float = Field(1.0, gt=0)
    caption_dropout: float | None = Field(None, ge=0, le=1)  # None: the phase's
    loss_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _selects_something(self):
        if self.caption_regex is None and self.domain is None:
            raise ValueError("a subset needs caption_regex or domain")
        if self.caption_regex is not None:
            try:
                re.compile(self.caption_regex)
            except re.error as exc:
                raise ValueError(f"caption_regex {self.caption_regex!r} is not a regular expression: {exc}") from None
        return self


class ValidationConfig(Section):
    """A fixed grid: held-out rows x timesteps x noise seeds, the same for every phase and every run."""

    rows: int = Field(4, ge=1)  # held-out rows (first by sha256); falls back to training rows when none are held out
    timesteps: list[int] = [100, 300, 500, 700, 900]
    noise_seeds: int = Field(2, ge=1)
    every_kimg: float | None = Field(None, gt=0)  # also mid-phase (None: at the end only)


class SamplesConfig(Section):
    """samples.png: fixed prompts x seeds, DDIM with trailing spacing, decoded with the codec."""

    prompts: list[str] = ["a photo of a", "a photo of b"]
    seeds: list[int] = [0, 1]
    steps: int = Field(8, ge=1)
    guidance_scale: float = Field(1.0, ge=1)  # 1: conditional only (half the cost); SD uses 5-7.5


class PhaseConfig(Section):
    parent: str  # 'init' or an earlier phase
    resolution_px: int = Field(ge=8)  # reads data/cache/<resolution_px>
    length_kimg: float = Field(gt=0)  # thousands of images this phase trains on
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    optimizer: Literal["adamw", "lion", "prodigy"] = "adamw"
    lr: float = Field(1e-4, gt=0)  # prodigy: must be 1.0 (it estimates the step size d itself; lr multiplies it)
    betas: tuple[float, float] | None = None  # None: the optimizer's own (AdamW 0.9/0.999, Lion 0.9/0.99, Prodigy 0.9/0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)  # AdamW / Prodigy
    lr_schedule: Literal["constant", "cosine", "cosine_restarts"] = "constant"
    lr_warmup_kimg: float = Field(0.0, ge=0)
    lr_cycles: int = Field(1, ge=1)  # cosine_restarts: hard restarts over the phase
    lr_min_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a fraction of lr
    clip_grad: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 adds a grad scaler
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % more time
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float | None = Field(None, gt=0)  # min-SNR-gamma loss weighting (5 is the paper's); None: off
    offset_noise: float = Field(0.0, ge=0)  # zero-frequency noise added per channel (0.05-0.1 typical)
    zero_terminal_snr: bool = False  # rescale betas so the last timestep is pure noise (use with v_prediction)
    caption_dropout: float = Field(0.1, ge=0, le=1)  # chance a caption is replaced by "" (enables CFG)
    ema_halflife_kimg: float | None = Field(None, gt=0)  # None: no EMA; a half-life in images, so batch size does not change it
    ema_rampup_ratio: float | None = Field(None, gt=0)
    subsets: dict[str, SubsetConfig] = {}  # empty: every training row once per epoch
    holdout_per_domain: int = Field(1, ge=0)  # images per domain (first by sha256, both flips) never trained on; validation uses them
    flip: bool = True  # also train on the cache's mirrored rows
    validation: ValidationConfig = ValidationConfig()
    samples: SamplesConfig = SamplesConfig()
    save_every_kimg: float = Field(0.1, gt=0)
    backups_kept: int = Field(2, ge=1)
    log_every_kimg: float = Field(0.05, gt=0)
    seed: int = 0  # data order, timesteps, noise and dropout are pure functions of (seed, step)
    guard: GuardConfig = GuardConfig()

    @property
    def length_images(self) -> int:
        return round(self.length_kimg * 1000)

    def resume_fingerprint_fields(self) -> dict[str, Any]:
        """What a backup must share to be resumed (cadence, validation and samples are not). The length is
        not either -- a lengthened phase continues from its end backup -- unless a cosine schedule is
        stretched by it, which changes every step's LR."""
        skip = {"save_every_kimg", "backups_kept", "log_every_kimg", "validation", "samples"}
        if self.lr_schedule == "constant":
            skip.add("length_kimg")
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


class DiffusionConfig(Section):
    device: str = "auto"
    devices: int = Field(1, ge=1)  # > 1: torchrun DDP on this many processes, as train.devices
    model: ModelSpec = ModelSpec()
    defaults: dict[str, Any] = {}
    stages: dict[str, PhaseConfig] = {}


def parse_diffusion(raw: Any, source: str = "params.yaml") -> DiffusionConfig:
    def fail(key: str, message: str) -> ParamsError:
        return ParamsError(f"{source}: diffusion.{key}: {message}")

    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise fail("stages", "the diffusion section must be a mapping")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise fail("defaults", "must be a mapping of phase settings")
    for key in defaults:
        if key in ("parent", "resolution_px"):
            raise fail(f"defaults.{key}", "set it in each phase (dvc.yaml builds the phase's paths from it)")
        if key not in PhaseConfig.model_fields:
            raise fail(f"defaults.{key}", f"unknown key; allowed keys: {', '.join(sorted(PhaseConfig.model_fields))}")
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise fail("stages", "must be an ordered map of phase name -> settings")
    merged = {name: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec for name, spec in stages.items()}
    cfg = parse_section({**raw, "stages": merged}, DiffusionConfig, "diffusion", source)
    seen: list[str] = []
    for name, phase in cfg.stages.items():
        where = f"stages.{name}"
        if not STAGE_NAME.match(name) or name == INIT:
            raise fail(where, f"a phase name is letters, digits and _ (starting with a letter), and not {INIT!r}")
        if phase.parent != INIT and phase.parent not in seen:
            later = " (it comes later: phases run in the order written)" if phase.parent in cfg.stages else ""
            raise fail(f"{where}.parent", f"{phase.parent!r} is not an earlier phase or {INIT!r}{later}; allowed here: {', '.join(repr(n) for n in [INIT, *seen])}")
        if phase.optimizer == "prodigy" and phase.lr != 1.0:
            raise fail(f"{where}.lr", f"{phase.lr:g} with optimizer prodigy: Prodigy estimates its own step size and lr multiplies it; set lr: 1.0 (schedules still apply)")
        if bad := [t for t in phase.validation.timesteps if not 0 <= t < cfg.model.num_train_timesteps]:
            raise fail(f"{where}.validation.timesteps", f"{bad} outside 0..{cfg.model.num_train_timesteps - 1}")
        seen.append(name)
    return cfg


def load_diffusion(path: Path | str = "params.yaml") -> DiffusionConfig:
    params = read_params(path)
    cfg = parse_diffusion(params.get("diffusion"), str(path))
    # Both families write runs/<name>: a phase named like an autoencoder stage would overwrite its folder.
    train_stages = ((params.get("train") or {}).get("stages") or {}) if isinstance(params.get("train"), dict) else {}
    if clash := [name for name in cfg.stages if name in train_stages]:
        raise ParamsError(f"{path}: diffusion.stages.{clash[0]}: the name is also a stage of train.stages, and both would write runs/{clash[0]}; rename the phase")
    return cfg


def phase_error(phase: str, key: str, message: str) -> ParamsError:
    """A check that needs the data or the model, worded like the static ones."""
    return ParamsError(f"params.yaml: diffusion.stages.{phase}.{key}: {message}")
