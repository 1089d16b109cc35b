"""What a phase reports: the loss on a fixed grid, and a sample grid.

Validation: every validation row x every timestep of ``validation.timesteps`` x ``noise_seeds`` noise
draws, seeded from (row position, seed) only, so two phases, two runs or the raw and EMA weights of one
run are measured on exactly the same noisy inputs. The loss is reported per timestep (``t100`` ...), per
subset and overall; a single noisy batch's loss would mostly measure which timesteps it happened to draw.

Samples: fixed prompts x seeds, DDIM with trailing timestep spacing (so the first step starts from the
last training timestep, which zero-terminal-SNR models need), decoded with the codec.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from stagewise.codecs import Codec
from stagewise.io import write_bytes
from stagewise.train.data import mix_seed
from stagewise.train.preview import to_pixels

VAL_SEED = 20_240_917  # fixed for every phase and run: the grid never changes


def target_for(scheduler, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)


@torch.no_grad()
def validation_loss(unet, scheduler, prediction: str, latents: torch.Tensor, cond: torch.Tensor, subsets: list[str],
                    timesteps: list[int], noise_seeds: int, batch: int = 16) -> dict[str, float]:
    """{"loss": mean, "t<k>": mean at timestep k, "subset_<name>": mean over that subset's rows}."""
    was_training = unet.training
    unet.eval()
    device = latents.device
    per_row = torch.zeros(len(timesteps), noise_seeds, len(latents), device=device)
    try:
        for s in range(noise_seeds):
            gen = torch.Generator(device=device).manual_seed(mix_seed(VAL_SEED, s))
            noise = torch.randn(latents.shape, generator=gen, device=device)
            for i, t in enumerate(timesteps):
                for lo in range(0, len(latents), batch):
                    x0, n, c = latents[lo : lo + batch], noise[lo : lo + batch], cond[lo : lo + batch]
                    tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
                    pred = unet(scheduler.add_noise(x0, n, tt), tt, c).sample.float()
                    target = target_for(scheduler, prediction, x0, n, tt)
                    per_row[i, s, lo : lo + batch] = (pred - target).pow(2).mean(dim=(1, 2, 3))
    finally:
        unet.train(was_training)
    out = {"loss": per_row.mean().item()}
    out.update({f"t{t}": v for t, v in zip(timesteps, per_row.mean(dim=(1, 2)).tolist())})
    for name in dict.fromkeys(subsets):
        mask = torch.tensor([s == name for s in subsets], device=device)
        out[f"subset_{name}"] = per_row[:, :, mask].mean().item()
    return out


@torch.no_grad()
def sample_latents(unet, scheduler_config: dict, prediction: str, zero_terminal_snr: bool, cond: torch.Tensor, uncond: torch.Tensor,
                   seeds: list[int], steps: int, guidance_scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(cond) * len(seeds), C, H, W) normalised latents, prompt-major."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", prediction_type=prediction, rescale_betas_zero_snr=zero_terminal_snr)
    ddim.set_timesteps(steps)
    device = cond.device
    noise = [torch.randn(shape, generator=torch.Generator(device=device).manual_seed(mix_seed(VAL_SEED, 99, s)), device=device) for s in seeds]
    x = torch.stack([n for _ in range(len(cond)) for n in noise]) * ddim.init_noise_sigma
    c = cond.repeat_interleave(len(seeds), dim=0)
    was_training = unet.training
    unet.eval()
    try:
        for t in ddim.timesteps:
            if guidance_scale > 1:
                both = unet(torch.cat([x, x]), t, torch.cat([uncond.expand_as(c), c])).sample.float()
                u, k = both.chunk(2)
                pred = u + guidance_scale * (k - u)
            else:
                pred = unet(x, t, c).sample.float()
            x = ddim.step(pred, t, x).prev_sample
    finally:
        unet.train(was_training)
    return x


def write_samples(path: Path, codec: Codec, latents: torch.Tensor, prompts: list[str], columns: int) -> None:
    """samples.png: one row per prompt (its text above it), one column per seed."""
    pixels = to_pixels(codec, latents)
    size = pixels.shape[-1]
    label_px = max(14, size // 12)
    font = ImageFont.load_default(size=round(label_px * 0.75))
    canvas = Image.new("RGB", (columns * size, len(prompts) * (label_px + size)), "white")
    draw = ImageDraw.Draw(canvas)
    images = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas.paste(Image.fromarray(img), (c * size, r * (label_px + size) + label_px))
    for r, prompt in enumerate(prompts):
        draw.text((2, r * (label_px + size) + label_px // 2), prompt[:80], fill="black", font=font, anchor="lm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
