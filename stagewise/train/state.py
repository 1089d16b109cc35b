"""Everything a training stage carries from step to step, and its round trip through a backup.

``TrainState`` holds the model, its optimizer, the grad scaler, EMA, LRD, the discriminator and its
optimizer, and the counters. ``tensors()`` / ``meta()`` split it into what goes into the backup's
safetensors file and its JSON; ``load()`` restores both.

Across stages (DFL keeps its optimizer when random warp, LRD or the GAN are switched): a stage ends by
writing ``carry_tensors()`` beside its model (``runs/<stage>/state.safetensors``) and its child starts
from it with ``carry_from()``: Adam's moments and step counts, the EMA averages and the discriminator
with its optimizer, for every tensor that still exists with the same shape; growth's new tensors start
fresh. A tensor frozen in a stage passes the state it was given on unchanged, so ``s256`` unfreezing
what ``s256_locked`` froze continues from ``s128``'s moments. ``reset_optimizer: true`` opts out. Random streams need no saving: the data order,
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


def _moment_fits(value: torch.Tensor, param: torch.Tensor) -> bool:
    """An Adam state tensor belongs to ``param``'s shape: a moment of the same shape, or the scalar step."""
    return value.dim() == 0 or value.shape == param.shape


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
            # the discriminator's own Adam, fused where possible (see above).
            self.d_opt = make_optimizer(list(self.disc.parameters()), "adam", cfg.gan.lr, cfg.gan.betas, cfg.gan.eps, 0.0, device)
        self.images_seen = 0
        self.step = 0
        self.lr_scale = 1.0  # lowered by each NaN rollback
        self.eps_scale = 1.0  # raised by each NaN rollback
        self.rollbacks = 0
        self.wall_s = 0.0  # training time over every run of this stage (resumes included)
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.carried_frozen: dict[str, torch.Tensor] = {}  # optimizer state of frozen tensors, passed on (carry_from)

    def apply(self, plan: Schedule) -> None:
        """Give the optimizers the schedule's learning rates and epsilons (floats: no device work)."""
        for opt, lr, eps in ((self.opt, plan.lr, plan.eps), (self.d_opt, plan.d_lr, plan.d_eps)):
            for group in opt.param_groups if opt is not None else []:
                group["lr"], group["eps"] = lr, eps

    def carry_tensors(self) -> dict[str, torch.Tensor]:
        """What the next stage starts from: optimizer moments (the trained tensors' own, and the carried ones
        of tensors frozen here), EMA averages, discriminator and its optimizer. No model weights: those are
        the stage's model.safetensors."""
        return {k: v for k, v in self.tensors().items() if not k.startswith("model.")}

    def carry_from(self, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        """Start from a parent stage's ``carry_tensors()``; returns how many tensors of each part carried."""
        shapes = dict(self.model.named_parameters())
        opt_state = {k: v for k, v in tensors.items() if k.startswith("opt.")}
        usable = {k: v for k, v in opt_state.items() if self._param_of(k, "opt") in shapes and _moment_fits(v, shapes[self._param_of(k, "opt")])}
        trained = set(self.param_names)
        load_optimizer_tensors(self.opt, self.param_names, "opt", usable)
        self.carried_frozen = {k: v for k, v in usable.items() if self._param_of(k, "opt") not in trained}
        counts = {"optimizer": len({self._param_of(k, "opt") for k in usable if self._param_of(k, "opt") in trained}), "frozen_kept": len({self._param_of(k, "opt") for k in self.carried_frozen})}
        if self.ema is not None and any(k.startswith("ema.") for k in tensors):
            ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            self.ema.load_state_dict({k: v for k, v in ema.items() if k not in shapes or v.shape == shapes[k].shape})
            counts["ema"] = len([k for k in ema if k in shapes])
        if self.disc is not None and self.d_opt is not None and any(k.startswith("disc.") for k in tensors):
            disc = {k[5:]: v for k, v in tensors.items() if k.startswith("disc.")}
            own = self.disc.state_dict()
            if set(disc) == set(own) and all(v.shape == own[k].shape for k, v in disc.items()):  # same D config
                self.disc.load_state_dict(disc)
                load_optimizer_tensors(self.d_opt, self.d_names, "d_opt", tensors)
                counts["discriminator"] = len(disc)
        return counts

    def _param_of(self, key: str, prefix: str) -> str:
        """``opt.encoder.blocks.16.conv1.weight.exp_avg`` -> ``encoder.blocks.16.conv1.weight``."""
        return key[len(prefix) + 1 :].rsplit(".", 1)[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update(self.carried_frozen)  # so a resumed stage still passes them on
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
        trained = set(self.param_names)
        self.carried_frozen = {k: v for k, v in tensors.items() if k.startswith("opt.") and self._param_of(k, "opt") not in trained}
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
