"""One DVC stage reproduced through DVC's Python API, in a process of its own; its answer is JSON.

    python -P flows/dvc_repro.py --answer FILE [--force] STAGE

What `dvc repro --single-item [--force] STAGE` does (`Repo.reproduce`), with the outcome written to
FILE for the flow instead of printed for a person: whether DVC reproduced the stage (the stages
`Repo.reproduce` returns), the exit status of each command DVC started for it, and the class of any
DVC error (its lock held by another process, a stage command that failed, anything else DVC
refused). Nothing is read back from DVC's log text, so a DVC release that rewords a line changes
nothing the flow reports.

Why a process and not a call in the flow: the stage's command inherits this process's stdout and
stderr, which the flow streams into the Prefect task log line by line, and cancelling the flow run
ends this process group, stage command included. Only the standard library and DVC are imported
(``-P``: this folder is not put on sys.path), so it starts as fast as `dvc` itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stage_commands() -> Iterator[list[subprocess.Popen]]:
    """The processes DVC starts for stage commands while this is open (DVC sets DVC_STAGE in their
    environment, a documented variable), so their exit status is known: DVC's StageCmdFailedError
    carries it only inside its message text."""
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    class Recorded(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if "DVC_STAGE" in (kwargs.get("env") or {}):
                started.append(self)

    subprocess.Popen = Recorded
    try:
        yield started
    finally:
        subprocess.Popen = popen


class _Prefixed(logging.Formatter):
    """DVC's records as `dvc repro` shows them: info as is, warnings and errors after "WARNING: " /
    "ERROR: " (the flow logs those lines at that level; the prefix is this formatter's, not DVC's)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def _log_dvc_to_stdout() -> None:
    """DVC's log, one stream (the order of its lines and the stage's is kept), in our format: importing
    DVC installs its console handlers, which this replaces."""
    import dvc.logger  # noqa: F401  (installs DVC's handlers first, so they are there to replace)

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Prefixed("%(message)s"))
    for name in ("dvc", "dvc_objects", "dvc_data"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__


def reproduce(stage: str, force: bool) -> dict:
    """{"reproduced": bool, "exit_statuses": [int], "error": None | {"kind", "message"}}; kind is
    "locked" (another DVC process holds the repository or the stage's outputs), "command" (a stage
    command exited non-zero) or "dvc" (DVC refused: missing dependency, invalid dvc.yaml...)."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageCmdFailedError

    answer: dict = {"reproduced": False, "exit_statuses": [], "error": None}
    with stage_commands() as started:
        try:
            with Repo(".") as repo:
                answer["reproduced"] = bool(repo.reproduce(stage, single_item=True, force=force))
        except DvcException as exc:
            causes = list(_causes(exc))
            kind = "locked" if any(isinstance(c, LockError) for c in causes) else "command" if any(isinstance(c, StageCmdFailedError) for c in causes) else "dvc"
            answer["error"] = {"kind": kind, "message": ": ".join(str(c) for c in causes)}
    answer["exit_statuses"] = [p.returncode for p in started]
    return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help="DVC stage address, as `dvc repro` takes it")
    parser.add_argument("--answer", required=True, help="JSON file to write the outcome to")
    parser.add_argument("--force", action="store_true", help="reproduce even if DVC finds the stage up to date")
    args = parser.parse_args(argv)
    _log_dvc_to_stdout()
    answer = reproduce(args.stage, args.force)
    partial = f"{args.answer}.partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(answer, file)
    os.replace(partial, args.answer)  # the flow reads a whole answer or none


if __name__ == "__main__":
    main()
