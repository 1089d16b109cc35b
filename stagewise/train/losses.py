"""Reconstruction losses on NCHW tensors (pixels in [-1, 1] or codec latents of about unit spread).

Public interface::

    mse(pred, target) -> Tensor                                  # mean squared error
    l1(pred, target) -> Tensor                                   # mean absolute error
    ssim_loss(pred, target, data_range=2.0, win_size=11, sigma=1.5) -> Tensor           # 1 - SSIM
    ms_ssim_loss(pred, target, data_range=2.0, win_size=11, sigma=1.5) -> Tensor        # 1 - MS-SSIM
    log_cosh(pred, target) -> Tensor
    focal_frequency(pred, target, alpha=1.0) -> Tensor
    LossWeights(Section)            # mse, l1, ssim, ms_ssim, log_cosh, focal_frequency (floats >= 0)
    reconstruction_loss(pred, target, weights, data_range=2.0) -> (total, {name: value})

Every function returns a 0-d tensor on the inputs' device (no ``.item()``, no host sync) and is
differentiable w.r.t. ``pred``. SSIM-type and frequency losses compute in float32 even under autocast:
their variances and spectra lose too much in bf16/fp16.

``data_range`` is the width of the value range (2.0 for [-1, 1], the training scale of every codec).
SSIM is computed per channel with a gaussian window ("valid" filtering, as in Wang et al. 2004), so a
32-channel latent is 32 single-channel SSIMs averaged. An image smaller than the window uses a smaller
(odd) window.

MS-SSIM (Wang et al. 2003) uses up to 5 scales (weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
halving the resolution between scales. Latents are small (16 px for a 128 px image in taef2), so it uses
only the scales whose shorter side is still >= ``win_size`` — 16 px: 1 scale (= SSIM), 32 px: 2,
64 px: 3, 128 px: 4, >= 176 px: all 5 — and renormalises the weights of the scales it uses to sum to 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from stagewise.config import Section

DATA_RANGE = 2.0  # every codec trains on about [-1, 1] (see Codec.normalize)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, fitted to human ratings
_SSIM_K1, _SSIM_K2 = 0.01, 0.03  # the standard stabilisers of Wang et al. 2004
_POSITIVE_FLOOR = 1e-6  # MS-SSIM raises per-scale terms to fractional powers: keep them > 0 so grads stay finite


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred.float(), target.float())


def log_cosh(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(log(cosh(pred - target))): quadratic for small errors, linear for large ones.

    Written as |d| + softplus(-2|d|) - log 2, which never overflows (cosh does beyond |d| ~ 89 in fp32)."""
    d = (pred.float() - target.float()).abs()
    return (d + F.softplus(-2.0 * d) - math.log(2.0)).mean()


def _gaussian_window(win_size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=torch.float32, device=device) - (win_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int, sigma: float):
    """Per-(image, channel) SSIM and contrast-structure term, each of shape (N, C)."""
    n, c, h, w = x.shape
    win = min(win_size, h, w)
    win -= 1 - win % 2  # odd, so the window has a centre
    g = _gaussian_window(win, sigma, x.device)
    # One grouped, separable filter pass over the five maps SSIM needs.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    if maps.device.type == "cpu":
        maps = maps.contiguous(memory_format=torch.channels_last)  # oneDNN's depthwise path: 2-9x faster on CPU
    groups = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, 1, win).expand(groups, 1, 1, win), groups=groups)
    maps = F.conv2d(maps, g.view(1, 1, win, 1).expand(groups, 1, win, 1), groups=groups)
    mu_x, mu_y, xx, yy, xy = maps.split(c, dim=1)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs_map
    return ssim_map.mean(dim=(2, 3)), cs_map.mean(dim=(2, 3))


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two NCHW tensors of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def ssim_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = DATA_RANGE,
    win_size: int = 11,  # Wang et al. 2004: 11x11 gaussian, sigma 1.5
    sigma: float = 1.5,
) -> torch.Tensor:
    """1 - SSIM, averaged over images and channels."""
    _check(pred, target)
    ssim, _ = _ssim_and_cs(pred.float(), target.float(), data_range, win_size, sigma)
    return 1.0 - ssim.mean()


def ms_ssim_scales(size_px: int, win_size: int = 11) -> int:
    """How many MS-SSIM scales an image whose shorter side is ``size_px`` gets (1 to 5)."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and (size_px >> scales) >= win_size:
        scales += 1
    return scales


def ms_ssim_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = DATA_RANGE,
    win_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """1 - MS-SSIM over as many scales as the image size allows (see the module docstring)."""
    _check(pred, target)
    x, y = pred.float(), target.float()
    scales = ms_ssim_scales(min(x.shape[-2:]), win_size)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32, device=x.device)
    weights = weights / weights.sum()
    terms = []
    for scale in range(scales):
        ssim, cs = _ssim_and_cs(x, y, data_range, win_size, sigma)
        if scale < scales - 1:
            terms.append(cs)
            pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)  # odd sizes: replicate the last row/column
            x = F.avg_pool2d(F.pad(x, pad, mode="replicate"), 2)
            y = F.avg_pool2d(F.pad(y, pad, mode="replicate"), 2)
        else:
            terms.append(ssim)  # luminance only at the coarsest scale
    stacked = torch.stack(terms, dim=0).clamp(min=_POSITIVE_FLOOR)  # (scales, N, C)
    ms_ssim = torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)
    return 1.0 - ms_ssim.mean()


def focal_frequency(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Focal frequency loss (Jiang et al. 2021, ICCV): squared distance of the 2-D spectra, each frequency
    weighted by its own spectrum error ``|F_pred - F_target| ** alpha``, normalised to [0, 1] by the
    per-(image, channel) maximum. The weights are detached: they choose which frequencies to focus on
    and are not themselves optimised (as in the paper)."""
    _check(pred, target)
    spec_pred = torch.fft.fft2(pred.float(), norm="ortho")
    spec_target = torch.fft.fft2(target.float(), norm="ortho")
    diff = spec_pred - spec_target
    distance = diff.real.square() + diff.imag.square()  # (N, C, H, W)
    with torch.no_grad():
        weight = distance.sqrt() ** alpha
        weight = weight / weight.amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)
        weight = weight.nan_to_num(0.0).clamp(0.0, 1.0)
    return (weight * distance).mean()


LOSSES = {
    "mse": mse,
    "l1": l1,
    "ssim": ssim_loss,
    "ms_ssim": ms_ssim_loss,
    "log_cosh": log_cosh,
    "focal_frequency": focal_frequency,
}
_RANGED = {"ssim", "ms_ssim"}  # the losses that take data_range


class LossWeights(Section):
    """Weight of each reconstruction loss in the total; a loss with weight 0 is not computed."""

    mse: float = Field(1.0, ge=0)  # DFL/faceswap's default reconstruction term
    l1: float = Field(0.0, ge=0)
    ssim: float = Field(0.0, ge=0)  # DFL's dssim; on 16 px latents prefer ssim over ms_ssim (same value, 1 scale)
    ms_ssim: float = Field(0.0, ge=0)
    log_cosh: float = Field(0.0, ge=0)
    focal_frequency: float = Field(0.0, ge=0)  # sharpens high frequencies; the paper uses weight 1.0

    @model_validator(mode="after")
    def _some_loss(self) -> "LossWeights":
        if not any(w > 0 for w in self.model_dump().values()):
            raise ValueError(f"at least one loss weight must be > 0 (choose from {', '.join(LOSSES)})")
        return self

    def active(self) -> dict[str, float]:
        return {name: w for name, w in self.model_dump().items() if w > 0}


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    data_range: float = DATA_RANGE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the losses with non-zero weight.

    Returns ``(total, parts)``: ``total`` carries the graph; ``parts`` maps each computed loss's name to
    its *unweighted*, detached value (0-d tensors on the device — call ``.item()`` only when logging)."""
    _check(pred, target)
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    for name, weight in weights.active().items():
        fn = LOSSES[name]
        value = fn(pred, target, data_range=data_range) if name in _RANGED else fn(pred, target)
        parts[name] = value.detach()
        total = weight * value if total is None else total + weight * value
    assert total is not None  # LossWeights guarantees one active loss
    return total, parts
