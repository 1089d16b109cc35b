"""Diffusion training throughput: images/s of the phase's real training step vs. the bare UNet.

Builds, in a temp folder, a latent cache of random latents of the right shape (what the step reads does
not change its cost), the init (UNet + text encoder built from configs, as diffuse_init does) and a
PhaseTrainer, then times, in the same process one after the other:

  train   PhaseTrainer.step(): row gather + normalise, noise / timesteps / caption dropout draws, text
          embeddings lookup, add_noise, UNet forward (autocast), target, min-SNR weights when set, backward,
          grad clip + norm, NaN guard, optimizer step, EMA: the loop's real step;
  bare    UNet forward + MSE + backward on the same batch already in memory, nothing else.

``ratio = train / bare``: the share of the bare UNet's speed the trainer keeps (target >= 0.9).

    python benchmarks/diffusion_throughput.py                       # tiny UNet of params.yaml, taef2 at 256 px, CPU
    python benchmarks/diffusion_throughput.py --preset sd15 --resolution 512 --batch 16 --precision bf16   # a GPU

Presets: ``tiny`` is params.yaml's diffusion.model on the taef2 codec (32 latent channels);
``sd15`` is SD 1.5's UNet config (860 M parameters, 4 latent channels at 1/8) with a 768-wide text encoder
(one layer: it is frozen and its embeddings are computed once, so its depth costs nothing per step).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stagewise.codecs import CodecConfig, load_codec  # noqa: E402
from stagewise.config import read_params  # noqa: E402
from stagewise.diffusion.config import parse_diffusion  # noqa: E402
from stagewise.diffusion.loop import PhaseJob, PhaseTrainer  # noqa: E402
from stagewise.latents import ShardWriter, to_bytes  # noqa: E402

SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_TEXT = dict(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=77)


def sd_like_vae(dest: Path) -> Path:
    """A random AutoencoderKL with SD's latent shape (4 channels, factor 8) but tiny widths: only its id and shape matter here."""
    import diffusers

    diffusers.AutoencoderKL(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            latent_channels=4, norm_num_groups=4, layers_per_block=1, scaling_factor=0.18215).save_pretrained(dest)
    return dest


def setup(folder: Path, args) -> PhaseTrainer:
    from stages.diffuse_init import main as diffuse_init

    params = read_params(ROOT / "params.yaml")
    codec_cfg = {"name": "taef2"} if args.preset == "tiny" else {"name": "diffusers", "weights": str(sd_like_vae(folder / "vae"))}
    model = params["diffusion"]["model"] if args.preset == "tiny" else {"unet": SD15_UNET, "text_encoder": SD15_TEXT}
    phase = {"parent": "init", "resolution_px": args.resolution, "length_kimg": 1000, "batch_size": args.batch, "precision": args.precision,
             "optimizer": args.optimizer, "lr": 1.0 if args.optimizer == "prodigy" else 1e-4, "gradient_checkpointing": args.checkpointing,
             "ema_halflife_kimg": 10.0, "holdout_per_domain": 0, "save_every_kimg": 1000, "log_every_kimg": 1000}
    (folder / "params.yaml").write_text(yaml.safe_dump({"codec": codec_cfg, "diffusion": {"device": args.device, "model": model, "stages": {"bench": phase}}}))
    codec = load_codec(CodecConfig(**codec_cfg))
    side = codec.latent_px(args.resolution)
    writer = ShardWriter(folder / "cache")
    gen = torch.Generator().manual_seed(0)
    for i in range(max(2 * args.batch, 16)):
        latent = torch.randn(codec.channels, side, side, generator=gen)
        writer.add(sha256=hashlib.sha256(str(i).encode()).hexdigest(), domain="ab"[i % 2], resolution=args.resolution, codec_id=codec.id, shape=list(latent.shape),
                   latent=to_bytes(latent), flipped=False, caption=f"a photo of {'ab'[i % 2]} number {i}", fingerprint="bench")
    writer.flush()
    diffuse_init(argparse.Namespace(params=str(folder / "params.yaml"), out=str(folder / "init")))
    cfg = parse_diffusion(yaml.safe_load((folder / "params.yaml").read_text())["diffusion"])
    return PhaseTrainer(PhaseJob("bench", cfg, CodecConfig(**codec_cfg), folder / "init", folder / "init" / "text", folder / "cache", folder / "run", folder / "run" / "backups", progress=False))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, seconds: float, min_steps: int = 3) -> float:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    start, n = time.perf_counter(), 0
    while n < min_steps or time.perf_counter() - start < seconds:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, default=256, help="image px (latent px = this / 8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--optimizer", choices=["adamw", "lion", "prodigy"], default="adamw")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (both sides)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per side")
    parser.add_argument("--rounds", type=int, default=2, help="train / bare alternations (the best of each is reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = setup(Path(tmp), args)
        dev, unet = t.device, t.unet
        rows, _ = t.data.indices(0, args.batch)
        d = t.draw(rows, 0)
        noisy, cond, target = t.scheduler.add_noise(d["x0"], d["noise"], d["t"]), t.embeddings[d["caption"]], t.target(d["x0"], d["noise"], d["t"])

        def bare():
            unet.zero_grad(set_to_none=True)
            with t.autocast():
                pred = unet(noisy, d["t"], cond).sample
            torch.nn.functional.mse_loss(pred.float(), target).backward()

        train_s, bare_s = [], []
        for _ in range(args.rounds):
            train_s.append(timed(t.step, dev, args.seconds))
            bare_s.append(timed(bare, dev, args.seconds))
        train_ips, bare_ips = args.batch / min(train_s), args.batch / min(bare_s)
        params_m = sum(p.numel() for p in unet.parameters()) / 1e6
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else ""
        print(f"preset {args.preset} ({params_m:.1f} M params), {t.codec.id}, {args.resolution} px ({t.data.latent_shape[-1]} latent px), batch {args.batch}, "
              f"{args.precision}, {args.optimizer}{', checkpointing' if args.checkpointing else ''}, {dev} ({torch.get_num_threads()} threads){peak}")
        print(f"  train step  {train_ips:8.2f} img/s")
        print(f"  bare UNet   {bare_ips:8.2f} img/s   (forward + backward, same batch)")
        print(f"  ratio       {train_ips / bare_ips:8.3f}")


if __name__ == "__main__":
    main()
