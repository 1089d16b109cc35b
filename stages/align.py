"""Detect, align and mask every face of ingest's kept images and video frames (params.yaml `align`).

Writes the manifest the filters and the cache read (--out): one kept row per aligned face crop (crop PNG
and mask PNG in --faces) and one rejected row with a reason per image, frame or video that gave no usable
face. With align.enabled false, --out is ingest's kept images and videos are rejected with a reason.
Detections are memoised per content hash and settings in --store, so a rerun processes only new sources.
"""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.config import load_section
from stagewise.faces.extract import AlignConfig, extract, summarize
from stagewise.io import write_parquet

log = logging.getLogger("stages.align")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("align", AlignConfig, args.params)
    manifest = cli.read_parquet(args.manifest, "manifest", "the ingest stage")
    faces, computed = extract(manifest, cfg, Path(args.faces), Path(args.store))
    write_parquet(args.out, faces)
    if cfg.enabled:
        log.info("processed %d new sources (the rest were memoised)\n%s", computed, summarize(faces))
    else:
        log.info("align.enabled is false: %d whole images passed through", int((faces["status"] == "kept").sum()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="ingest's manifest Parquet; only its `kept` rows are read")
    parser.add_argument("--out", required=True, help="the faces manifest Parquet to write (what the filters and the cache read)")
    parser.add_argument("--faces", required=True, help="folder of aligned crops and masks (crops/<sha>.png, masks/<sha>.png); rewritten by every run")
    parser.add_argument("--store", required=True, help="folder of memoised detections (safe to delete)")
    cli.run(main, parser)
