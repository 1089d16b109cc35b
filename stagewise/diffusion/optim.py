"""Optimizers (AdamW, Lion, Prodigy), the LR schedule, and their round trip through a backup.

The LR is a pure function of the images seen in the phase (``lr_factor``), so a resumed phase and an
uninterrupted one use the same LR at every step with no scheduler state to save. Prodigy's ``lr`` is a
multiplier of its own estimate ``d`` (so it must be 1.0; schedules still apply to it).

Backups keep an optimizer's per-parameter tensors in the safetensors file (``opt.<param>.<key>``) and
everything else in the JSON: per-parameter scalars (Prodigy's ``step``) and each param group's settings,
which for Prodigy hold its running estimates (``d``, ``d_max``, ``d_numerator``, ``k``, ...).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from stagewise.diffusion.config import PhaseConfig

log = logging.getLogger(__name__)


def lr_factor(images_seen: int, cfg: PhaseConfig) -> float:
    """Multiplier of ``cfg.lr`` after ``images_seen`` images: linear warm-up, then constant, cosine, or
    cosine with ``lr_cycles`` hard restarts, down to ``lr_min_ratio``."""
    warmup = cfg.lr_warmup_kimg * 1000
    if warmup and images_seen < warmup:
        return (images_seen + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (images_seen - warmup) / max(cfg.length_images - warmup, 1)))
    if cfg.lr_schedule == "cosine_restarts":
        progress = (progress * cfg.lr_cycles) % 1.0 if progress < 1.0 else 1.0
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], cfg: PhaseConfig, device: torch.device) -> torch.optim.Optimizer:
    betas = {"betas": tuple(cfg.betas)} if cfg.betas else {}
    if cfg.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **betas)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, **betas)
    kwargs = dict(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, **betas)
    try:  # fused: a non-finite step is skipped on the device (guard.skip_if_not_finite), no host sync
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def optimizer_state(opt: torch.optim.Optimizer, names: list[str], prefix: str = "opt") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for the safetensors file, the rest for the JSON), keyed by parameter name."""
    state = opt.state_dict()
    if sum(len(g["params"]) for g in state["param_groups"]) != len(names):
        raise ValueError(f"{prefix}: {len(names)} names for the optimizer's parameters")
    tensors, scalars = {}, {}
    for index, name in enumerate(names):
        for key, value in state["state"].get(index, {}).items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{name}.{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "groups": groups}


def load_optimizer_state(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "opt") -> None:
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        head = f"{prefix}.{name}."
        entry = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        entry.update(meta["scalars"].get(name, {}))
        if entry:
            state[index] = entry
    current = opt.state_dict()["param_groups"]
    if len(current) != len(meta["groups"]):
        raise ValueError(f"{prefix}: {len(meta['groups'])} saved param groups, the optimizer has {len(current)}")
    groups = [{**saved, "betas": tuple(saved["betas"]) if "betas" in saved else None, "params": now["params"]} for saved, now in zip(meta["groups"], current)]
    groups = [{k: v for k, v in g.items() if not (k == "betas" and v is None)} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})
