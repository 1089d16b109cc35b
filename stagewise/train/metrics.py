"""metrics.json: how well the stage's final model reconstructs images it never trained on.

Per domain, on the held-out images (or, with ``holdout_per_domain: 0``, a few training images, marked
``split: train``): the stage's reconstruction loss in latent space (no warp), and PSNR / SSIM in pixel
space between the decoded reconstruction and the decoded target latent, both rounded to 8 bit
(scikit-image, ``data_range=255``). Comparing against the decoded *latent* rather than the original file
measures the model, not the codec; the codec's own round-trip error is a separate, fixed figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stagewise.codecs import Codec
from stagewise.models.autoencoder import DOMAINS, Autoencoder
from stagewise.train.losses import LossWeights, reconstruction_loss
from stagewise.train.preview import to_pixels

EVAL_BATCH = 8


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def pixel_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over a batch of HWC uint8 images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # scipy: 0.7 s to import

    psnr, ssim = [], []
    for p, t in zip(pred, target):
        win = min(7, *t.shape[:2])  # skimage's default window, smaller for tiny test images
        win -= 1 - win % 2
        with np.errstate(divide="ignore"):
            psnr.append(peak_signal_noise_ratio(t, p, data_range=255))
        ssim.append(structural_similarity(t, p, data_range=255, channel_axis=2, win_size=win))
    # Identical images have an infinite PSNR; cap each at 100 dB so the mean stays a number.
    return float(np.mean([min(v, 100.0) for v in psnr])), float(np.mean(ssim))


@torch.no_grad()
def evaluate(model: Autoencoder, codec: Codec, images: dict[str, torch.Tensor], weights: LossWeights, split: str) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"split": split}
    try:
        for domain in DOMAINS:
            x = images[domain]
            if not len(x):
                continue
            pred = torch.cat([model(chunk, domain) for chunk in x.split(EVAL_BATCH)])
            total, parts = reconstruction_loss(pred, x, weights)
            psnr, ssim = pixel_scores(_uint8(to_pixels(codec, pred)), _uint8(to_pixels(codec, x)))
            out[domain] = {
                "images": len(x),
                "loss": float(total),
                **{f"loss_{k}": float(v) for k, v in parts.items()},
                "psnr_db": round(psnr, 3),
                "ssim": round(ssim, 4),
            }
    finally:
        model.train(was_training)
    return out
