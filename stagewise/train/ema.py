"""Exponential moving average of model weights, with the half-life counted in images (edm / edm2 style).

Public interface::

    ema = EMA(model, halflife_kimg=10.0, rampup_ratio=None)
    ema.update(model, images_this_step)      # after each optimizer step
    ema.beta(images_this_step) -> float      # the decay that update would use now
    ema.copy_to(model)                       # write the averaged weights into the model
    with ema.applied(model): ...             # averaged weights temporarily (previews, evaluation)
    ema.state_dict() -> {name: Tensor}       # plain tensors, safetensors-ready
    ema.load_state_dict(state)
    ema.images_seen                          # images averaged so far (int)

The decay per step is ``beta = 0.5 ** (images_this_step / (halflife_kimg * 1000))``: after
``halflife_kimg`` thousand images the weight of the starting point is 0.5, whatever the batch size
(Karras et al. 2022, edm ``ema_halflife_kimg``). With ``rampup_ratio`` (edm uses 0.05) the half-life is at
most ``images_seen * rampup_ratio``, so early random weights are forgotten fast.

Only parameters are averaged (buffers are the model's own). The model may change between updates:
- a *new* parameter name (growth added a block) or a changed shape starts its average from the model;
- a parameter that disappeared is dropped;
- a *frozen* parameter (``requires_grad=False``) is copied, not averaged, so the averaged model's frozen
  weights are bit-identical to the training model's (freezing promises that).
Averages are kept in float32 whatever the model's dtype, on the parameter's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_IMAGES_SEEN_KEY = "__ema_images_seen__"  # stored beside the averages in state_dict()


class EMA:
    def __init__(self, model: nn.Module, halflife_kimg: float = 10.0, rampup_ratio: float | None = None):
        # 10 kimg: a few hundred steps at CPU batch sizes; long enough to smooth the noise of small batches
        if halflife_kimg <= 0:
            raise ValueError(f"ema halflife_kimg must be > 0, got {halflife_kimg}")
        if rampup_ratio is not None and rampup_ratio <= 0:
            raise ValueError(f"ema rampup_ratio must be > 0 or None, got {rampup_ratio}")
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio
        self.images_seen = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._sync(model)

    def beta(self, images_this_step: int) -> float:
        halflife_images = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife_images = min(halflife_images, (self.images_seen + images_this_step) * self.rampup_ratio)
        return 0.5 ** (images_this_step / max(halflife_images, 1e-8))

    def _sync(self, model: nn.Module) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """Match the averages to the model's current parameters; return (average, param) of the trainable ones."""
        pairs = []
        names = set()
        with torch.no_grad():
            for name, p in model.named_parameters():
                names.add(name)
                avg = self.shadow.get(name)
                if avg is None or avg.shape != p.shape:
                    avg = self.shadow[name] = p.detach().to(dtype=torch.float32, copy=True)
                elif avg.device != p.device:
                    avg = self.shadow[name] = avg.to(p.device)
                if p.requires_grad:
                    pairs.append((avg, p))
                else:
                    avg.copy_(p)  # frozen: follow the model exactly
        for stale in set(self.shadow) - names:
            del self.shadow[stale]
        return pairs

    @torch.no_grad()
    def update(self, model: nn.Module, images_this_step: int) -> None:
        beta = self.beta(images_this_step)
        pairs = self._sync(model)
        if pairs:
            averages = [a for a, _ in pairs]
            params = [p.detach().float() for _, p in pairs]
            torch._foreach_lerp_(averages, params, 1.0 - beta)  # avg += (1 - beta) * (p - avg)
        self.images_seen += images_this_step

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        self._sync(model)
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights restored after."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: t.detach().clone() for name, t in self.shadow.items()}
        state[_IMAGES_SEEN_KEY] = torch.tensor(self.images_seen, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averages (matched to the model, grown or not, at the next update / copy_to)."""
        self.shadow = {k: v.detach().to(torch.float32, copy=True) for k, v in state.items() if k != _IMAGES_SEEN_KEY}
        self.images_seen = int(state[_IMAGES_SEEN_KEY]) if _IMAGES_SEEN_KEY in state else 0
