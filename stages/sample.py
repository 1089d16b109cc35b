"""Build the embedded sample data set (two domains plus deliberate defects) from bundled photos.

Not a DVC stage: the sample is the default input (params.yaml data.domains), like a user's folder, so
nothing in the DAG depends on or rebuilds it once data.domains points elsewhere. `make demo` runs this
before `dvc repro`; it does nothing when --out already holds the sample of these settings.
"""

import argparse
import inspect
import logging
from pathlib import Path

from stagewise import cli
from stagewise.config import fingerprint, load_section
from stagewise.io import write_text
from stagewise import sample
from stagewise.sample import SampleConfig, build_sample

log = logging.getLogger("stages.sample")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("sample", SampleConfig, args.params)
    out = Path(args.out)
    stamp = out / "settings.fingerprint"  # beside a/ and b/, not in them: no domain folder sees it
    built_by = fingerprint(cfg, inspect.getsource(sample))  # the settings and the code that draws the crops
    if stamp.exists() and stamp.read_text().strip() == built_by:
        log.info("%s already holds the sample for these settings; nothing to do", out)
        return
    defects = build_sample(out, cfg)
    write_text(stamp, built_by + "\n")  # last: a killed build leaves no stamp and is redone
    log.info("wrote %d clean crops per domain and %d defects to %s", cfg.crops_per_domain, sum(map(len, defects.values())), args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to (re)build; holds a/ and b/")
    cli.run(main, parser)
