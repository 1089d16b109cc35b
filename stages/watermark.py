"""Score every image the manifest kept with rapidocr's bundled text detector; reject stamped ones.

Detector boxes are memoised by content hash in --store, so changing `watermark.threshold` or
`watermark.min_line_aspect` re-decides without running the detector, and new images are the only ones
detected. With `watermark.clip` and/or `watermark.vlm` configured (a cascade; off by default), only images
whose text score is uncertain (`band_low` <= score < `band_high`) go on to CLIP zero-shot and then to the
VLM; their embeddings / answers are memoised in --clip-store / --vlm-store. Writes one row per kept image:
status, reason (naming the step that decided), score and the raw numbers behind it.
"""

import argparse
import logging
from pathlib import Path


from stagewise import cli
from stagewise.config import load_section
from stagewise.curation.watermark import WatermarkConfig, run_cascade, summarize
from stagewise.io import write_parquet

log = logging.getLogger("stages.watermark")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("watermark", WatermarkConfig, args.params)
    manifest = cli.read_parquet(args.manifest, "manifest", "the ingest stage")
    try:
        frame, counts = run_cascade(
            manifest, cfg, Path(args.store),
            clip_store=args.clip_store and Path(args.clip_store), vlm_store=args.vlm_store and Path(args.vlm_store),
            head_dir=args.head and Path(args.head),
        )
    except FileNotFoundError as exc:
        raise cli.StageError(str(exc)) from None
    write_parquet(args.out, frame)
    cascade = f"; {counts['uncertain']} uncertain, CLIP embedded {counts['clip_embedded']}, VLM asked about {counts['vlm_asked']}" if cfg.cascade_on else ""
    head = "" if not args.head else f"; the learned head on {counts['headed']}" if counts["head_on"] else "; no learned head (watermark_head.enabled is false)"
    log.info("ran the text detector on %d images%s (the rest were memoised)%s\n%s", counts["detected"], head, cascade, summarize(frame))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="ingest's manifest Parquet; only its `kept` rows are scored")
    parser.add_argument("--out", required=True, help="Parquet file to write (one row per kept image)")
    parser.add_argument("--store", required=True, help="folder of memoised detector boxes (safe to delete)")
    parser.add_argument("--head", help="folder with the learned head (head.safetensors + head.json, from the watermark_head stage); "
                        "without it the text detector decides alone")
    parser.add_argument("--clip-store", help="folder of memoised CLIP embeddings, shared with near_dup (default: STORE/clip)")
    parser.add_argument("--vlm-store", help="folder of memoised VLM answers, may be shared with vlm_filter (default: STORE/vlm)")
    cli.run(main, parser)
