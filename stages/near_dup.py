"""Find near-duplicates among the images the manifest kept; keep one of each group, reject the others.

Perceptual hashes (and CLIP embeddings when `near_dup.clip` names a model) link images; each group keeps
an image that every --upstream filter kept, then the largest, then the sharpest. Rejected rows name the
kept twin: `near-duplicate: of data/sample/a/a_004.jpg (phash distance 2)`. Hashes are memoised by content
hash in --store (CLIP embeddings in --clip-store, shared with the watermark stage), so only new images
are hashed; the grouping is recomputed every run.
"""

import argparse
import logging
from pathlib import Path


from stagewise import cli
from stagewise.config import load_section
from stagewise.curation.neardup import NearDupConfig, find_near_duplicates, summarize
from stagewise.io import write_parquet

log = logging.getLogger("stages.near_dup")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("near_dup", NearDupConfig, args.params)
    manifest = cli.read_parquet(args.manifest, "manifest", "the ingest stage")
    upstream = {path: cli.read_parquet(path, "upstream filter output") for path in args.upstream}
    for path, frame in upstream.items():
        missing = {"path", "sha256", "status"} - set(frame.columns)
        if missing:
            raise cli.StageError(f"upstream filter output {path}: missing column(s) {', '.join(sorted(missing))}")
    frame, counts = find_near_duplicates(manifest, cfg, Path(args.store), upstream, args.clip_store and Path(args.clip_store))
    write_parquet(args.out, frame)
    log.info("hashed %d images (the rest were memoised); %d hash pairs, %d CLIP pairs\n%s",
             counts["hashed"], counts["hash_pairs"], counts["clip_pairs"], summarize(frame, counts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="ingest's manifest Parquet; only its `kept` rows are compared")
    parser.add_argument("--upstream", action="append", default=[], metavar="PARQUET",
                        help="an earlier filter's output: its rejected images are grouped but never kept over a twin it kept; repeatable")
    parser.add_argument("--out", required=True, help="Parquet file to write (one row per kept image of the manifest)")
    parser.add_argument("--store", required=True, help="folder of memoised hashes (safe to delete)")
    parser.add_argument("--clip-store", help="folder of memoised CLIP embeddings, shared with the watermark stage (default: STORE/clip)")
    cli.run(main, parser)
