"""Scan the domain folders and write the manifest: every candidate file kept or rejected with a reason."""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.config import load_section
from stagewise.curation.ingest import IngestConfig, ingest, summarize
from stagewise.domains import check_folders
from stagewise.io import write_parquet

log = logging.getLogger("stages.ingest")


def parse_domain(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, Path(folder)


def main(args: argparse.Namespace) -> None:
    cfg = load_section("ingest", IngestConfig, args.params)
    out = Path(args.out)
    domains = check_folders(dict(args.domain), source=args.params)  # dvc.yaml passes data.domains: name the key, before any work
    try:
        manifest, decoded = ingest(domains, cfg, Path(args.store), previous_manifest=out)
    except FileNotFoundError as exc:
        raise cli.StageError(str(exc)) from None
    write_parquet(out, manifest)
    log.info("decoded %d new or changed files\n%s", decoded, summarize(manifest))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", action="append", type=parse_domain, required=True, metavar="NAME=FOLDER", help="a domain and its image folder (dvc.yaml passes params.yaml data.domains); repeat for each domain (a and b)")
    parser.add_argument("--out", required=True, help="manifest Parquet file to write")
    parser.add_argument("--store", required=True, help="folder of memoised per-image results (safe to delete)")
    cli.run(main, parser)
