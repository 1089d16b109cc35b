"""Train one diffusion phase (params.yaml diffusion.stages.<name>) from its parent's UNet.

To resume after a kill, run the same command again: it continues from the newest good backup in
--backups made with the same config, parent and data, bit-identical to an uninterrupted run. Writes
unet.safetensors + unet.json, metrics.json (validation loss per timestep and subset, raw and EMA weights),
history.tsv, samples.png and events.jsonl to --out. With diffusion.devices > 1 it re-launches itself
under torchrun on that many processes (DDP: stagewise/train/dist.py).
"""

import argparse
import logging
import sys
from pathlib import Path

from stagewise import cli
from stagewise.codecs import CodecConfig
from stagewise.config import ParamsError, load_section
from stagewise.diffusion.config import load_diffusion, phase_error
from stagewise.diffusion.loop import PhaseJob, run_phase
from stagewise.train import dist

log = logging.getLogger("stages.diffuse")


def main(args: argparse.Namespace) -> None:
    cfg = load_diffusion(args.params)
    if args.phase not in cfg.stages:
        raise ParamsError(f"{args.params}: diffusion.stages.{args.phase}: no such phase; the recipe has {', '.join(cfg.stages) or 'none'}")
    if cfg.devices > 1 and not dist.launched():  # diffusion.devices: this same command on N processes under torchrun
        if error := dist.batch_split_error(cfg.stages[args.phase].batch_size, cfg.devices, "diffusion.devices"):
            raise phase_error(args.phase, "batch_size", error)
        dist.relaunch("stages.diffuse", cfg.devices, sys.argv[1:])
    job = PhaseJob(name=args.phase, diffusion=cfg, codec=load_section("codec", CodecConfig, args.params), parent_dir=Path(args.parent),
                   text_dir=Path(args.text), cache_dir=Path(args.cache), out_dir=Path(args.out),
                   backups_dir=Path(args.backups) if args.backups else Path(args.out) / "backups", progress=not args.no_progress)
    metrics = run_phase(job)
    if not metrics:  # a DDP rank other than 0: rank 0 publishes and reports
        return
    raw = metrics["val"]["raw"]
    log.info("%s: %g kimg in %.0f s; %s validation loss %.4f (%s)%s", args.phase, metrics["kimg"], metrics["wall_s"], metrics["split"], raw["loss"],
             ", ".join(f"{k} {v:.4f}" for k, v in raw.items() if k.startswith("t")), f", EMA {metrics['val']['ema']['loss']:.4f}" if "ema" in metrics["val"] else "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.diffuse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, help="phase name: a key of params.yaml diffusion.stages")
    parser.add_argument("--parent", required=True, help="the parent's folder (runs/<parent>, runs/init for the first) holding unet.safetensors")
    parser.add_argument("--text", required=True, help="the frozen text encoder + tokenizer folder (runs/init/text)")
    parser.add_argument("--cache", required=True, help="latent cache folder at the phase's resolution (data/cache/<resolution_px>)")
    parser.add_argument("--out", required=True, help="this phase's folder (runs/<phase>)")
    parser.add_argument("--backups", help="resume state folder (default: <out>/backups; a DVC persist folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    cli.run(main, parser)
