"""Check the input folders of params.yaml `data.domains` before any work, and record them.

First stage of the DAG: it reruns whenever `data.domains` changes, so a folder that does not exist, is
a file or holds no image fails here with the key to fix (`data.domains.<name>`), before DVC hashes the
folders as `ingest`'s dependencies (whose own message would name only the path). Writes --out, the
domains and their folders as JSON, which `ingest` depends on so that it always runs after this check.
"""

import argparse
import logging

from stagewise import cli
from stagewise.config import load_section
from stagewise.domains import DataConfig, check_folders
from stagewise.io import write_json

log = logging.getLogger("stages.domains")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("data", DataConfig, args.params)
    check_folders(cfg.domains, source=args.params)
    write_json(args.out, cfg.domains)
    log.info("domains: %s", ", ".join(f"{name} = {folder}" for name, folder in cfg.domains.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.domains", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write: each domain and its folder")
    cli.run(main, parser)
