"""Build the init model: the two-domain autoencoder at model.resolution_px, freshly initialised."""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import ParamsError, load_section
from stagewise.models import ModelConfig, init_model
from stagewise.train.checkpoint import save_model

log = logging.getLogger("stages.init")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("model", ModelConfig, args.params)
    codec_cfg = load_section("codec", CodecConfig, args.params)
    # Only the codec's shape matters here (channels, factor, id); its weights are not needed to build.
    codec = load_codec(codec_cfg)
    try:
        model = init_model(cfg, codec.channels, codec.factor)
    except ValueError as exc:
        raise ParamsError(f"{args.params}: model: {exc}") from None
    meta = {"stage": "init", "codec_id": codec.id, "resolution_px": cfg.resolution_px, "images_seen": 0, "config": {}}
    save_model(Path(args.out), model, meta)
    params = sum(p.numel() for p in model.parameters())
    log.info("init model: %s px (%d latent px, %d ch), %.2f M parameters -> %s", cfg.resolution_px, model.latent_px, codec.channels, params / 1e6, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and meta.json to (runs/init)")
    cli.run(main, parser)
