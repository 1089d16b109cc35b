"""Everything a training stage carries from step to step, and its round trip through a backup.

``TrainState`` holds the model, its optimizer, the grad scaler, EMA, LRD, the discriminator and its
optimizer, and the counters. ``tensors()`` / ``meta()`` split it into what goes into the backup's
safetensors file and its JSON; ``load()`` restores both. Random streams need no saving: the data order,
warp, flip and LRD masks are all seeded from (stage seed, step).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from stagewise.models.autoencoder import Autoencoder
from stagewise.train.data import mix_seed
from stagewise.train.checkpoint import load_optimizer_tensors, optimizer_tensors
from stagewise.train.ema import EMA
from stagewise.train.freeze import Trainable
from stagewise.train.gan import make_discriminator
from stagewise.train.lrd import LRDropout
from stagewise.train.recipe import StageConfig
from stagewise.train.schedule import Schedule

log = logging.getLogger(__name__)


def make_optimizer(params: list[nn.Parameter], kind: str, lr: float, betas, eps: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW, fused where the device has the kernel: a fused step can skip a non-finite update on
    the device (``found_inf``), so the NaN guard needs no host sync."""
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError) as exc:  # a device without fused Adam: the guard syncs instead
        log.info("fused %s unavailable on %s (%s); using the foreach implementation", kind, device, exc)
        return cls(params, foreach=True, **kwargs)


class TrainState:
    def __init__(self, model: Autoencoder, cfg: StageConfig, trainable: Trainable, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.param_names = trainable.names
        # lr and eps here are placeholders: every step sets the schedule's (``apply``)
        self.opt = make_optimizer(trainable.params, cfg.optimizer, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, device)
        # fp16 needs loss scaling (its exponent range loses small gradients); bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.ema = EMA(model, cfg.ema.halflife_kimg, cfg.ema.rampup_ratio) if cfg.ema.halflife_kimg else None
        self.lrd = LRDropout(cfg.lr_dropout, torch.Generator(device=device)) if cfg.lr_dropout < 1 else None
        self.disc: nn.Module | None = None
        self.d_opt: torch.optim.Optimizer | None = None
        if cfg.gan_power > 0:
            with torch.random.fork_rng(devices=[]):  # seeded: a rerun starts from the same D
                torch.manual_seed(mix_seed(cfg.seed, 3))
                self.disc = make_discriminator(model.channels, cfg.gan).to(device)
            self.d_names = [n for n, _ in self.disc.named_parameters()]
            # gan.make_d_optimizer builds a plain Adam; ours is the same Adam, fused where possible (see above).
            self.d_opt = make_optimizer(list(self.disc.parameters()), "adam", cfg.gan.lr, cfg.gan.betas, cfg.gan.eps, 0.0, device)
        self.images_seen = 0
        self.step = 0
        self.lr_scale = 1.0  # lowered by each NaN rollback
        self.eps_scale = 1.0  # raised by each NaN rollback
        self.rollbacks = 0
        self.wall_s = 0.0  # training time over every run of this stage (resumes included)
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def apply(self, plan: Schedule) -> None:
        """Give the optimizers the schedule's learning rates and epsilons (floats: no device work)."""
        for opt, lr, eps in ((self.opt, plan.lr, plan.eps), (self.d_opt, plan.d_lr, plan.d_eps)):
            for group in opt.param_groups if opt is not None else []:
                group["lr"], group["eps"] = lr, eps

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update(optimizer_tensors(self.opt, self.param_names, "opt"))
        if self.ema is not None:
            out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if self.disc is not None and self.d_opt is not None:
            out.update({f"disc.{k}": v for k, v in self.disc.state_dict().items()})
            out.update(optimizer_tensors(self.d_opt, self.d_names, "d_opt"))
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "images_seen": self.images_seen,
            "step": self.step,
            "lr_scale": self.lr_scale,
            "eps_scale": self.eps_scale,
            "rollbacks": self.rollbacks,
            "wall_s": self.wall_s,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "history": self.history,
            "events": self.events,
        }

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], counters_too: bool = True) -> None:
        """Restore a backup. ``counters_too=False`` (a NaN rollback) keeps this run's LR/eps scales,
        rollback count, history and events, so the rollback itself is not forgotten."""

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

        self.model.load_state_dict(part("model"))
        load_optimizer_tensors(self.opt, self.param_names, "opt", tensors)
        if self.ema is not None:
            self.ema.load_state_dict(part("ema"))
        if self.disc is not None and self.d_opt is not None:
            self.disc.load_state_dict(part("disc"))
            load_optimizer_tensors(self.d_opt, self.d_names, "d_opt", tensors)
        if self.scaler.is_enabled() and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.images_seen, self.step = meta["images_seen"], meta["step"]
        if counters_too:
            self.lr_scale, self.eps_scale, self.rollbacks = meta["lr_scale"], meta["eps_scale"], meta["rollbacks"]
            self.wall_s = meta["wall_s"]
            self.history, self.events = list(meta["history"]), list(meta["events"])
        else:
            self.history = [row for row in self.history if row["images_seen"] <= self.images_seen]
