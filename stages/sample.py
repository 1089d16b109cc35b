"""Build the embedded sample data set (two domains plus deliberate defects) from bundled photos."""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.config import load_section
from stagewise.sample import SampleConfig, build_sample

log = logging.getLogger("stages.sample")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("sample", SampleConfig, args.params)
    defects = build_sample(Path(args.out), cfg)
    log.info("wrote %d clean crops per domain and %d defects to %s", cfg.crops_per_domain, sum(map(len, defects.values())), args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to (re)build; holds a/ and b/")
    cli.run(main, parser)
