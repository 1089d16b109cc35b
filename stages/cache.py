"""Encode every curated image at one resolution into the latent cache (Parquet shards), incrementally.

Reads the `cache` and `codec` sections of params.yaml. The output folder is its own store: images
already encoded with the same codec, resolution and crop policy are reused; captions are updated in
place; images no longer in the dataset are pruned. Running it again after a kill continues.
"""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.cache import CacheConfig, read_dataset, update_cache
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import load_section
from stagewise.device import pick_device
from stagewise.domains import DOMAINS
from stagewise.io import write_json
from stagewise.report import rejection_reasons

log = logging.getLogger("stages.cache")

EPILOG = """\
TAEF2 weights (codec.name: taef2) are searched in codec.weights, $STAGEWISE_MODELS/taef2 and
~/.cache/stagewise/taef2, then downloaded from github.com/madebyollin/taesd (sha256-checked;
STAGEWISE_OFFLINE=1 skips that). Without weights, set codec.name: pixels (identity codec).
"""


def main(args: argparse.Namespace) -> None:
    cfg = load_section("cache", CacheConfig, args.params)
    codec_cfg = load_section("codec", CodecConfig, args.params)
    if args.resolution not in cfg.resolutions:
        log.warning("resolution %d px is not in cache.resolutions %s", args.resolution, cfg.resolutions)
    try:
        dataset = read_dataset(args.dataset)
    except (FileNotFoundError, ValueError) as exc:
        raise cli.StageError(str(exc)) from None
    check_every_domain_kept(dataset, Path(args.dataset))
    device = pick_device(cfg.device)
    codec = load_codec(codec_cfg, device)
    try:
        codec.latent_px(args.resolution)
    except ValueError as exc:
        raise cli.StageError(f"--resolution {args.resolution}: {exc}") from None
    log.info("caching %d images at %d px with %s on %s into %s", len(dataset), args.resolution, codec.id, device, args.out)
    result = update_cache(dataset, Path(args.out), args.resolution, codec, cfg, device, masks_dir=args.masks and Path(args.masks))
    log.info("%s", result.summary())
    if args.stats:  # what this run did, in rows: `dvc metrics show` lists it per resolution
        write_json(args.stats, {
            "rows_encoded": result.encoded, "images_encoded": result.images_encoded, "rows_reused": result.reused,
            "rows_pruned": result.pruned, "rows_relabelled": result.relabelled, "images_failed": len(result.failed),
            "shards_rewritten": len(result.rewritten_shards), "shards_new": len(result.new_shards),
        })  # fmt: skip
    for path, reason in sorted(result.failed.items()):
        log.warning("failed: %s: %s", path, reason)


def check_every_domain_kept(dataset, dataset_path: Path) -> None:
    """The model trains on both domains: one with no image left after curation is a data problem to fix
    before encoding anything, so say how many of its files each curation step rejected and why."""
    empty = [d for d in DOMAINS if not (dataset["domain"] == d).any()]
    if not empty:
        return
    lines = []
    for domain in empty:
        reasons = rejection_reasons(dataset_path.parent, domain)
        counted = "; ".join(f"{step}.parquet: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) for step, kinds in reasons.items())
        lines.append(f"domain {domain} (params.yaml data.domains.{domain}) has no image left after curation in {dataset_path}"
                     + (f"; rejected in {counted}" if counted else "; its folder held no candidate file"))
    raise cli.StageError("\n".join(lines) + "\nAdd usable images to that folder (or relax the step's params) and run `dvc repro` again.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.cache", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, required=True, help="image size in pixels (square centre crop), one of cache.resolutions")
    parser.add_argument("--dataset", required=True, help="the curated dataset Parquet (path, domain, sha256, caption, ...)")
    parser.add_argument("--out", required=True, help="cache folder for this resolution; updated in place (a DVC persist output)")
    parser.add_argument("--masks", default=None, metavar="FOLDER", help="the align stage's face masks (<sha256>.png); each row also stores its masks at latent size")
    parser.add_argument("--stats", default=None, metavar="JSON", help="also write what this run did (rows encoded, reused, pruned, relabelled)")
    return parser


if __name__ == "__main__":
    cli.run(main, build_parser())
