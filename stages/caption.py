"""Build the curated dataset: images kept by ingest and by every filter, each with a caption.

A sidecar `<stem>.txt` or `<stem>.caption` next to the image wins (unless `caption.overwrite`); otherwise
the captioner named by `caption.captioner` (`template` fills `caption.template`; `transformers` runs the
image-to-text model `caption.model`). Captioner results are memoised by content hash in --store, so only
new images are captioned. Then, on every caption: `caption_filter` selects the subset that becomes the
dataset (--captions-out lists every image with the reason it was dropped), `prefix`/`suffix` are added
and `shuffle_tags` reorders comma-separated tags per image.
"""

import argparse
import logging
from pathlib import Path


from stagewise import cli
from stagewise.config import load_section
from stagewise.curation.caption import CaptionConfig, FilterError, caption_dataset, finish_captions, make_captioner
from stagewise.io import write_parquet

log = logging.getLogger("stages.caption")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("caption", CaptionConfig, args.params)
    manifest = cli.read_parquet(args.manifest, "manifest", "the ingest stage")
    filters = {path: cli.read_parquet(path, "filter output") for path in args.filter}
    try:
        captioned, counts = caption_dataset(
            manifest, filters, make_captioner(cfg), Path(args.store), cfg.batch_size, cfg.max_pixels, cfg.workers, cfg.overwrite
        )
    except FilterError as exc:
        raise cli.StageError(str(exc)) from None
    dataset, captions = finish_captions(captioned, cfg)
    if args.captions_out:
        write_parquet(args.captions_out, captions)
    write_parquet(args.out, dataset)
    if cfg.caption_filter is not None:
        log.info("caption_filter kept %d of %d captioned images", len(dataset), len(captions))
    by_filter = ", ".join(f"{k.split(':', 1)[1]} dropped {v}" for k, v in counts.items() if k.startswith("dropped_by:")) or "no filters"
    log.info(
        "%d images in the dataset (%s); captions: %d sidecar, %d memoised, %d new from the %s captioner; %d unreadable dropped",
        len(dataset), by_filter, counts["sidecar"], counts["memoised"], counts["captioned"], cfg.captioner, counts["unreadable"],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="ingest's manifest Parquet")
    parser.add_argument("--filter", action="append", default=[], metavar="PARQUET", help="a filter stage's output (path, sha256, status per image); repeat for each filter")
    parser.add_argument("--out", required=True, help="dataset Parquet file to write (the images caption_filter keeps)")
    parser.add_argument("--captions-out", default=None, metavar="PARQUET", help="also write every captioned image with status and reason (what caption_filter dropped)")
    parser.add_argument("--store", required=True, help="folder of memoised captioner results (safe to delete)")
    cli.run(main, parser)
