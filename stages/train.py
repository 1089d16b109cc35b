"""Train one stage of the recipe (params.yaml train.stages.<name>) from its parent's model.

To resume after a kill, run the same command again: it continues from the newest good backup in
--backups made with the same config, parent, cache rows and code (a changed loss, warp or model
trains from the parent again). Writes model.safetensors, meta.json, metrics.json,
history.tsv, preview.png and events.jsonl to --out. With train.devices > 1 it re-launches itself under
torchrun on that many processes (DDP: stagewise/train/dist.py).
"""

import argparse
import logging
import sys
from pathlib import Path

from stagewise import cli
from stagewise.codecs import CodecConfig
from stagewise.config import ParamsError, load_section
from stagewise.train import dist
from stagewise.train.loop import StageJob, run_stage
from stagewise.train.recipe import load_train, stage_error

log = logging.getLogger("stages.train")


def parent_cache(cache: Path, resolution_px: int) -> Path | None:
    """data/cache/<resolution_px / 2> beside --cache: a growth stage's fade-in reads the real latents of the
    half-size images there. Not a dvc.yaml dep of its own: the parent model, one, was trained on it."""
    half = cache.with_name(str(resolution_px // 2))
    return half if half.is_dir() else None


def main(args: argparse.Namespace) -> None:
    train = load_train(args.params)
    if args.stage not in train.stages:
        raise ParamsError(f"{args.params}: train.stages.{args.stage}: no such stage; the recipe has {', '.join(train.stages)}")
    if train.devices > 1 and not dist.launched():  # train.devices: this same command on N processes under torchrun
        if error := dist.batch_split_error(train.stages[args.stage].batch_size, train.devices, "train.devices"):
            raise stage_error(args.stage, "batch_size", error)
        dist.relaunch("stages.train", train.devices, sys.argv[1:])
    job = StageJob(
        name=args.stage,
        train=train,
        codec=load_section("codec", CodecConfig, args.params),
        parent_dir=Path(args.parent),
        cache_dir=Path(args.cache),
        out_dir=Path(args.out),
        backups_dir=Path(args.backups) if args.backups else Path(args.out) / "backups",
        progress=not args.no_progress,
        parent_cache_dir=parent_cache(Path(args.cache), train.stages[args.stage].resolution_px),
    )
    metrics = run_stage(job)
    if not metrics:  # a DDP rank other than 0: rank 0 publishes and reports
        return
    scores = ", ".join(f"{d}: {metrics[d]['psnr_db']:.2f} dB / SSIM {metrics[d]['ssim']:.3f}" for d in ("a", "b") if d in metrics)
    log.info("%s: %g kimg in %.0f s; %s reconstruction %s", args.stage, metrics["kimg"], metrics["wall_s"], metrics["split"], scores)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", required=True, help="stage name: a key of params.yaml train.stages")
    parser.add_argument("--parent", required=True, help="the parent stage's folder (runs/<parent>) holding model.safetensors")
    parser.add_argument("--cache", required=True, help="latent cache folder at the stage's resolution (data/cache/<resolution_px>)")
    parser.add_argument("--out", required=True, help="this stage's folder (runs/<stage>)")
    parser.add_argument("--backups", help="resume state folder (default: <out>/backups; a DVC persist folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    cli.run(main, parser)
