"""Score every image the manifest kept with rapidocr's bundled text detector; reject stamped ones.

Detector boxes are memoised by content hash in --store, so changing `watermark.threshold` or
`watermark.min_line_aspect` re-decides without running the detector, and new images are the only ones
detected. Writes one row per kept image: status, reason, score and the raw numbers behind it.
"""

import argparse
import logging
from pathlib import Path

import pandas as pd

from stagewise import cli
from stagewise.config import load_section
from stagewise.curation.watermark import WatermarkConfig, score_images, summarize
from stagewise.io import write_parquet

log = logging.getLogger("stages.watermark")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("watermark", WatermarkConfig, args.params)
    try:
        manifest = pd.read_parquet(args.manifest)
    except FileNotFoundError:
        raise cli.StageError(f"manifest not found: {args.manifest} (run the ingest stage first)") from None
    try:
        frame, detected = score_images(manifest, cfg, Path(args.store))
    except FileNotFoundError as exc:
        raise cli.StageError(str(exc)) from None
    write_parquet(args.out, frame)
    log.info("ran the text detector on %d images (the rest were memoised)\n%s", detected, summarize(frame))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="ingest's manifest Parquet; only its `kept` rows are scored")
    parser.add_argument("--out", required=True, help="Parquet file to write (one row per kept image)")
    parser.add_argument("--store", required=True, help="folder of memoised detector boxes (safe to delete)")
    cli.run(main, parser)
