"""Write reports/summary.md (curation counts with reasons, a row per training stage) and reports/metrics.json."""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.config import load_section
from stagewise.io import write_json, write_text
from stagewise.report import ReportConfig, build_report

log = logging.getLogger("stages.report")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("report", ReportConfig, args.params)
    text, metrics = build_report(cfg, Path(args.curated), Path(args.cache), Path(args.runs))
    write_text(args.out, text)
    write_json(args.metrics, metrics)
    log.info("wrote %s (%d training stages)", args.out, len(metrics["stages"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--curated", required=True, help="folder of curation Parquet files (manifest, filters, dataset)")
    parser.add_argument("--cache", required=True, help="latent cache root (one folder per resolution)")
    parser.add_argument("--runs", required=True, help="folder of training stage folders (runs/<stage>/meta.json, metrics.json)")
    parser.add_argument("--out", required=True, help="Markdown summary to write")
    parser.add_argument("--metrics", required=True, help="JSON metrics to write (a DVC metrics file)")
    cli.run(main, parser)
