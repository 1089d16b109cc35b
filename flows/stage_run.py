"""One DVC stage as a Prefect task: DVC reproduces it (or finds it up to date), its output streams
into the task log, and its outcome decides whether Prefect retries.

The stage runs in its own process (flows/dvc_repro.py, `Repo.reproduce` of DVC's Python API), whose
JSON answer says what DVC did; the stage command's exit status says what kind of failure it was:
`stagewise.cli.USER_ERROR_EXIT` is the user's to fix (fail at once), a signal (a kill, the OOM
killer, a segfault) or an I/O-type exception is worth another try, anything else is a bug. Prefect
adds retries, live logs, artifacts and the UI and caches nothing (NO_CACHE, no persisted results), so
a task never "completes" without DVC having checked its stage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from flows.artifacts import publish_artifacts
from flows.dag import StageInfo
from stagewise.cli import USER_ERROR_EXIT

# Transient failures (a kill, an I/O error) are retried this many times, after these delays.
# A training stage resumes from its last backup, so a retry loses at most one save interval.
RETRIES = 2
RETRY_DELAYS_S = [10, 60]
RETRY_JITTER = 0.3  # spread retries of concurrent runs so they do not hit a flaky disk together
# A tqdm bar rewrites its line many times a second; one of those updates per interval reaches the log.
PROGRESS_LOG_INTERVAL_S = 15.0
DVC_REPRO = Path(__file__).with_name("dvc_repro.py")
# Exceptions that a second try can fix: the OS and network family (a flaky disk, a dropped mount, a
# reset connection). Other exceptions are bugs or bad data and would fail the same way again.
TRANSIENT_EXCEPTIONS = {
    "OSError", "IOError", "EnvironmentError", "BlockingIOError", "ChildProcessError", "ConnectionError",
    "BrokenPipeError", "ConnectionAbortedError", "ConnectionRefusedError", "ConnectionResetError",
    "InterruptedError", "TimeoutError",
}
# Python's own report of an uncaught exception (exit status 1): the last line of its traceback names
# the exception. This reads the stage's stderr, not DVC's log.
_TRACEBACK_START = "Traceback (most recent call last)"
_TRACEBACK_LAST = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))\b")
_LINE_END = re.compile(rb"(\r\n|\n|\r)")

log = logging.getLogger("flows")


@dataclass
class StageOutcome:
    """What one stage did: the task's result when it succeeded, the data of its Failed state otherwise."""

    stage: str
    outcome: str  # ran | up to date | restored from run cache | failed | already running
    seconds: float
    exit_status: int | None = None  # of the stage's own command, when DVC ran it and it failed
    message: str = ""
    retryable: bool = False
    artifacts: tuple[str, ...] = ()
    tail: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome not in ("failed", "already running")

    def row(self) -> dict:
        """The line of the flow's summary."""
        return {"stage": self.stage, "outcome": self.outcome, "seconds": round(self.seconds, 1), "artifacts": self.artifacts}


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as task.fn() outside a run (tests, scripts)
        return log


def stage_env() -> dict[str, str]:
    """The environment of DVC and the stages: this interpreter's bin folder first on PATH, so the
    `python` in every stage's cmd is the project's; unbuffered output, so lines reach the log as they come."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- one stage through DVC -------------------------------------------------------------------------


def _lines(stream) -> Iterator[tuple[str, bool]]:
    """(text, is_progress) for each line of a byte stream; a progress bar's '\\r' updates are lines too."""
    fd = stream.fileno()
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        parts = _LINE_END.split(pending + chunk)
        pending = parts.pop()
        for text, end in zip(parts[0::2], parts[1::2]):
            if text.strip():
                yield text.decode("utf-8", "replace").rstrip(), end == b"\r"
    if pending.strip():
        yield pending.decode("utf-8", "replace").rstrip(), False


def _level(line: str) -> int:
    """The log level of an output line: "error: ..." (stagewise.cli), a traceback, or dvc_repro.py's
    "ERROR: " / "WARNING: " prefix for DVC's records. Only the display depends on it."""
    head = line.lstrip()[:10].lower()
    if head.startswith("error") or head.startswith("traceback"):
        return logging.ERROR
    return logging.WARNING if head.startswith("warning") else logging.INFO


def _stop(proc: subprocess.Popen) -> None:
    """End DVC and the stage command under it (its own process group), gently first."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _stream(proc: subprocess.Popen, logger: Any, tail: deque[str]) -> None:
    last_progress_log = 0.0
    unlogged_progress = None
    for text, is_progress in _lines(proc.stdout):
        if is_progress:
            now = time.monotonic()
            if now - last_progress_log < PROGRESS_LOG_INTERVAL_S:
                unlogged_progress = text
                continue
            last_progress_log = now
        unlogged_progress = None
        tail.append(text)
        logger.log(_level(text), "%s", text)
    if unlogged_progress:
        logger.info("%s", unlogged_progress)


def run_dvc_stage(project: str | Path, stage: str, force: bool = False, logger: Any = None) -> StageOutcome:
    """Reproduce one stage as `dvc repro --single-item [--force] <stage>` would, every output line
    logged as it comes; the outcome is DVC's answer (flows/dvc_repro.py), not its log text.

    Single item: DVC checks this stage alone against dvc.lock (the flow runs the stages in DAG order,
    so the upstream ones were checked just before).
    """
    logger = logger or run_logger()
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=400)
    with tempfile.TemporaryDirectory(prefix="stagewise-repro-") as tmp:
        answer_file = Path(tmp) / "answer.json"
        cmd = [sys.executable, "-P", str(DVC_REPRO), "--answer", str(answer_file), *(["--force"] if force else []), stage]
        # Own process group: cancelling the flow run ends the stage too, not just DVC.
        proc = subprocess.Popen(cmd, cwd=project, env=stage_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _stream(proc, logger, tail)
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                _stop(proc)
        answer = json.loads(answer_file.read_text()) if answer_file.is_file() else None
    lines = list(tail)
    if answer is None:  # dvc_repro.py itself crashed (a DVC bug, a broken install): its traceback is in the log
        message = f"{DVC_REPRO.name} exited with {returncode} without an answer" + (f": {lines[-1]}" if lines else "")
        return StageOutcome(stage, "failed", time.monotonic() - started, message=message, tail=lines)
    return classify(stage, answer, lines, time.monotonic() - started)


def classify(stage: str, answer: dict, lines: list[str], seconds: float) -> StageOutcome:
    """What happened, from DVC's answer and the stage command's exit status: ran / up to date /
    restored from run cache, or which failure (``lines``, the stage's output, give its message)."""
    error = answer["error"]
    if error is None:
        outcome = "up to date" if not answer["reproduced"] else "ran" if answer["exit_statuses"] else "restored from run cache"
        return StageOutcome(stage, outcome, seconds, tail=lines)
    if error["kind"] == "locked":
        message = f"already running: another DVC process is working on this pipeline ({error['message']}). Wait for it to finish, then run again."
        return StageOutcome(stage, "already running", seconds, message=message, tail=lines)
    failed = [status for status in answer["exit_statuses"] if status != 0]
    if error["kind"] != "command" or not failed:  # DVC itself refused (missing dependency, invalid dvc.yaml): fix, don't retry
        return StageOutcome(stage, "failed", seconds, message=error["message"], tail=lines)
    exited = failed[-1]
    if exited == USER_ERROR_EXIT:  # the stage said what to fix, on lines "error: ..."
        stage_errors = [line.strip() for line in lines if line.lstrip().startswith("error:")]
        message = "\n".join(stage_errors) or f"stage command exited with {exited}" + (f": {lines[-1].strip()}" if lines else "")
        return StageOutcome(stage, "failed", seconds, exited, message=message, tail=lines)
    signal_name = _signal_name(exited)
    cause = exception = None
    traceback_at = max((i for i, line in enumerate(lines) if line.startswith(_TRACEBACK_START)), default=None)
    if traceback_at is not None:
        cause = next((line.strip() for line in reversed(lines[traceback_at:]) if _TRACEBACK_LAST.match(line.strip())), None)
        exception = _TRACEBACK_LAST.match(cause).group(1).rsplit(".", 1)[-1] if cause else None
    described = f"killed by {signal_name}" if signal_name else f"exited with {exited}"
    message = f"stage command {described}" + (f": {cause}" if cause else "")
    # Killed: worth another try, and a training stage resumes from its last backup; so is an I/O-type
    # exception. Any other exception, or a non-zero exit with none: a bug or bad data.
    retryable = signal_name is not None or exception in TRANSIENT_EXCEPTIONS
    return StageOutcome(stage, "failed", seconds, exited, message=message, retryable=retryable, tail=lines)


def _signal_name(exited: int) -> str | None:
    """"SIGKILL" whether the shell DVC runs the command in reports the signal as -9 (it exec'd the
    command) or as 137 (it forked and waited); None for an ordinary exit status."""
    signum = -exited if exited < 0 else exited - 128 if exited > 128 else None
    try:
        return signal.Signals(signum).name if signum else None
    except ValueError:
        return None


# --- the Prefect task ------------------------------------------------------------------------------


def _retry_if_transient(task, task_run, state: State) -> bool:
    failure = state.data if isinstance(state.data, StageOutcome) else None
    return bool(failure and failure.retryable)


@task(cache_policy=NO_CACHE, persist_result=False, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S, retry_jitter_factor=RETRY_JITTER, retry_condition_fn=_retry_if_transient)
def run_stage(stage: StageInfo, project: str = ".", force: bool = False, known_fresh: bool = False) -> StageOutcome | State:
    """Run one DVC stage (DVC decides whether it is stale) and publish its artifacts.

    ``known_fresh``: DVC's status already found the stage unchanged and nothing upstream ran since,
    so reproducing it would only say so again. A failure returns a Failed state carrying the stage's
    own message: retried when transient, final at once when the stage exited with USER_ERROR_EXIT
    or another process holds the pipeline.
    """
    logger = run_logger()
    if known_fresh and not force:
        logger.info("Stage '%s' didn't change (dvc status), skipping", stage.name)
        result = StageOutcome(stage.name, "up to date", 0.0)
    else:
        result = run_dvc_stage(project, stage.name, force=force, logger=logger)
    if not result.ok:
        logger.error("%s: %s", stage.name, result.message)
        return Failed(message=result.message, data=result)
    logger.info("%s: %s in %.1f s", stage.name, result.outcome, result.seconds)
    try:
        result.artifacts = tuple(publish_artifacts(project, stage))
    except Exception as exc:  # an unreadable output must not fail a stage that DVC finished
        logger.warning("%s: could not build artifacts: %r", stage.name, exc)
    result.tail = []  # the log has every line; the result need not carry them
    return result


def stage_task(name: str) -> Task:
    """`run_stage` named after the stage in the UI, with this module's retry policy as it is now."""
    return run_stage.with_options(name=name, task_run_name=name, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S)
