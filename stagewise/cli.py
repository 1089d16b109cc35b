"""What every `python -m stages.<name>` entry point shares: logging and clean failures.

A known failure (bad params, a missing weight file, exhausted NaN rollbacks) prints one clear message
and exits USER_ERROR_EXIT (2) with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable


class StageError(RuntimeError):
    """A failure the user can act on; its message says what happened and what to do."""


# The exit status of a failure the user must fix (bad params, a missing weight file, a full disk, exhausted
# NaN rollbacks): the message says what to do, and running it again unchanged would fail the same way.
# The Prefect flows read it from the stage's exit status to fail at once instead of retrying.
USER_ERROR_EXIT = 2
# Out of space, quota or a file-size limit: the user's to fix, and every write is atomic, so a rerun is safe.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def read_parquet(path: str, what: str, producer: str = "the stage that writes it"):
    """A stage's input table; a missing one says which stage to run first rather than a traceback."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise StageError(f"{what} not found: {path} (run {producer} first)") from None


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    from stagewise import cluster
    from stagewise.config import ParamsError, check_sections

    parser.add_argument("--params", default="params.yaml", help="params file to read this stage's section from (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        check_sections(args.params)  # a misspelled section would otherwise leave its stage on defaults, silently
        # The params' cluster section, current for the stage's per-image maps (stagewise.cluster); local by default.
        with cluster.session(cluster.config_from_params(args.params)):
            main(args)
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror}{where}. The disk (or a size limit) is full; every file is written atomically, so free some "
              "space and run the same command again: it continues from what was saved.", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
