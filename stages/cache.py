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
    device = pick_device(cfg.device)
    codec = load_codec(codec_cfg, device)
    try:
        codec.latent_px(args.resolution)
    except ValueError as exc:
        raise cli.StageError(f"--resolution {args.resolution}: {exc}") from None
    log.info("caching %d images at %d px with %s on %s into %s", len(dataset), args.resolution, codec.id, device, args.out)
    result = update_cache(dataset, Path(args.out), args.resolution, codec, cfg, device)
    log.info("%s", result.summary())
    for path, reason in sorted(result.failed.items()):
        log.warning("failed: %s: %s", path, reason)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.cache", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, required=True, help="image size in pixels (square centre crop), one of cache.resolutions")
    parser.add_argument("--dataset", required=True, help="the curated dataset Parquet (path, domain, sha256, caption, ...)")
    parser.add_argument("--out", required=True, help="cache folder for this resolution; updated in place (a DVC persist output)")
    return parser


if __name__ == "__main__":
    cli.run(main, build_parser())
