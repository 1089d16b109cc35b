"""Build what every diffusion phase starts from (params.yaml diffusion.model) into --out (runs/init):
unet.safetensors + unet.json (its config, the DDPM scheduler's, the codec id) and text/ (the frozen CLIP
text encoder and tokenizer). From an SD-layout folder (diffusion.model.pretrained: unet/, text_encoder/,
tokenizer/, scheduler/) or from configs; conv_in / conv_out follow the codec's latent channels.
"""

import argparse
import logging
import shutil
from pathlib import Path

from stagewise import cli
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import load_section
from stagewise.diffusion import model as dm
from stagewise.diffusion.config import load_diffusion
from stagewise.diffusion.loop import save_unet

log = logging.getLogger("stages.diffuse_init")


def main(args: argparse.Namespace) -> None:
    cfg = load_diffusion(args.params)
    codec = load_codec(load_section("codec", CodecConfig, args.params))
    out = Path(args.out)
    staging = out / ".text-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        unet, scheduler = dm.build_init(cfg.model, codec.channels, staging)  # every check before anything is published
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build leaves nothing behind
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(out / dm.TEXT_DIR, ignore_errors=True)
    staging.rename(out / dm.TEXT_DIR)
    meta = {"phase": "init", "codec_id": codec.id, "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
            "scheduler": {k: v for k, v in scheduler.items() if not k.startswith("_")}, "model": cfg.model.model_dump(mode="json")}
    save_unet(out, unet.state_dict(), meta)
    log.info("init UNet: %.2f M parameters, %d latent channels (%s); text encoder hidden size %d", sum(p.numel() for p in unet.parameters()) / 1e6,
             codec.channels, codec.id, unet.config.cross_attention_dim)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.diffuse_init", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for unet.safetensors, unet.json and text/ (runs/init)")
    cli.run(main, parser)
