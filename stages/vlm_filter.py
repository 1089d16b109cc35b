"""Ask a vision-language model yes/no questions about every image the manifest kept; reject on configured answers.

`vlm_filter.model` names the model (hub id, or a folder made with save_pretrained); with no model (the
default) every image is kept with the reason `vlm_filter: skipped (no model configured)`. Answers are
memoised by content hash in --store: a rerun asks only about new images, a killed run resumes, and
changing which answers reject (`vlm_filter.questions[].reject`) re-decides without running the model.
Writes one row per kept image: status, reason, the answer to every question (JSON) and what decided.
"""

import argparse
import logging
from pathlib import Path


from stagewise import cli
from stagewise.config import load_section
from stagewise.curation.vlm import VlmConfig, filter_images, summarize
from stagewise.io import write_parquet

log = logging.getLogger("stages.vlm_filter")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("vlm_filter", VlmConfig, args.params)
    manifest = cli.read_parquet(args.manifest, "manifest", "the ingest stage")
    frame, asked = filter_images(manifest, cfg, Path(args.store))
    write_parquet(args.out, frame)
    if cfg.model is None:
        log.info("no vlm_filter.model configured: kept all %d images unasked", len(frame))
    else:
        log.info("asked the model about %d images (the rest were memoised)\n%s", asked, summarize(frame))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="ingest's manifest Parquet; only its `kept` rows are asked about")
    parser.add_argument("--out", required=True, help="Parquet file to write (one row per kept image)")
    parser.add_argument("--store", required=True, help="folder of memoised answers (safe to delete)")
    cli.run(main, parser)
