"""DVC stages as Prefect tasks: read the DAG from DVC, run each stage through `dvc repro`, publish artifacts.

DVC alone decides what is stale. A run starts with one `dvc status` over the selected stages; then
each task runs `dvc repro --single-item <stage>`, which skips a stage whose deps, params and outs still
match dvc.lock -- unless `dvc status` already found the stage unchanged and nothing upstream of it has
rerun since (then a second DVC call would only say so again). Prefect adds retries, live logs,
artifacts and the UI and caches nothing (NO_CACHE, no persisted results), so a task never "completes"
without DVC having checked its stage. Parameter overrides are written into params.yaml with DVC's
own `--set-param` code (what `dvc exp run -S` does), so params.yaml and dvc.lock stay the record of
what produced the outputs, and `dvc params diff` / `dvc exp show` see them.

The flows in this package only compose `run_pipeline`; nothing here knows the stage names.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.states import Failed, State
from prefect.utilities.annotations import quote

from flows import artifacts

# Transient failures (a crash, a kill, an I/O error) are retried this many times, after these delays.
# A training stage resumes from its last backup, so a retry loses at most one save interval.
RETRIES = 2
RETRY_DELAYS_S = [10, 60]
RETRY_JITTER = 0.3  # spread retries of concurrent runs so they do not hit a flaky disk together
# A tqdm bar rewrites its line many times a second; one of those updates per interval reaches the log.
PROGRESS_LOG_INTERVAL_S = 15.0
# Exit status with which `stagewise.cli` reports a failure the user must fix (bad params, NaN rollbacks
# exhausted, a missing weight file): retrying cannot help, so the stage fails at once.
USER_ERROR_EXIT = 2
LOCK_NAME = "stagewise-pipeline.lock"  # in .dvc/tmp: per repository, never committed

log = logging.getLogger("flows")


class PipelineError(RuntimeError):
    """The pipeline cannot start: bad stage selection, bad override, another run holds the lock."""


@dataclass(frozen=True)
class StageInfo:
    """One DVC stage as the DAG declares it (paths relative to the project root)."""

    name: str  # DVC address, e.g. "ingest" or "train@lrd"
    group: str  # the foreach group ("train" for "train@lrd"), else the name
    upstream: tuple[str, ...] = ()  # stages whose outputs this one reads, directly
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageRun:
    """What a stage task returns (the flow reads the outcome to know what reran)."""

    stage: str
    outcome: str  # ran | up to date | restored from run cache
    seconds: float
    artifacts: tuple[str, ...] = ()


@dataclass
class StageOutcome:
    stage: str
    outcome: str  # ran | up to date | restored from run cache | failed | already running
    seconds: float
    returncode: int = 0  # of `dvc repro`
    stage_returncode: int | None = None  # of the stage's own command, when DVC ran it
    message: str = ""
    retryable: bool = False
    tail: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as task.fn() outside a run (tests, scripts)
        return log


# --- the DAG ---------------------------------------------------------------------------------------


def read_dag(project: str | Path) -> list[StageInfo]:
    """Every pipeline stage of the repository in an order DVC could run them (dependencies first).

    Ties are broken by the order of the stages in dvc.yaml, so the order is stable between runs.
    """
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    try:
        with Repo(str(project)) as repo:
            graph = repo.index.graph  # edges run from a stage to the stages it depends on
            stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
            position = {s: i for i, s in enumerate(stages)}
            order = [s for s in nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: position.get(s, -1)) if s in position]
            root = Path(repo.root_dir)

            def rel(path: str) -> str:
                return Path(os.path.relpath(path, root)).as_posix()

            def address(stage) -> str:  # as `dvc repro` takes it from the project root
                dvcfile = rel(stage.dvcfile.path)
                return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

            return [
                StageInfo(
                    name=address(s),
                    group=s.name.split("@", 1)[0],
                    upstream=tuple(address(d) for d in graph.successors(s) if d in position),
                    outs=tuple(rel(o.fs_path) for o in s.outs),
                    metrics=tuple(rel(o.fs_path) for o in s.outs if o.metric),
                    plots=tuple(rel(o.fs_path) for o in s.outs if o.plot),
                )
                for s in order
            ]
    except DvcException as exc:
        raise PipelineError(f"DVC cannot read the pipeline in {project}: {exc}") from None


def select(dag: list[StageInfo], targets: list[str] | None, upstream: bool = True, missing_ok: bool = False) -> list[StageInfo]:
    """The stages to run, in DAG order.

    ``targets`` are stage names ("train@lrd"), foreach groups ("train" = every train@...), or globs
    ("train@s256*"); None means every stage. With ``upstream``, the stages they depend on are added
    too, as `dvc repro <target>` would (DVC skips those that are up to date). Unknown names are an
    error listing the known ones, unless ``missing_ok`` (for flows that name stages which a pipeline
    may not have, like `curate`).
    """
    if targets is None:
        return list(dag)
    by_name = {s.name: s for s in dag}
    chosen: set[str] = set()
    for target in targets:
        matched = [s.name for s in dag if s.name == target or s.group == target or fnmatch.fnmatchcase(s.name, target)]
        if not matched and not missing_ok:
            raise PipelineError(f"no stage matches {target!r}; the pipeline has: {', '.join(by_name)}")
        chosen.update(matched)
    if not chosen:
        raise PipelineError(f"none of {targets} is a stage of this pipeline; it has: {', '.join(by_name)}")
    if upstream:
        todo = list(chosen)
        while todo:
            for parent in by_name[todo.pop()].upstream:
                if parent not in chosen:
                    chosen.add(parent)
                    todo.append(parent)
    return [s for s in dag if s.name in chosen]


# --- parameter overrides ---------------------------------------------------------------------------


def apply_set_params(project: str | Path, overrides: list[str] | None) -> None:
    """Write `dvc exp run -S` style overrides (`[file:]key.path=value`, `+new=1`, `~drop`) into the
    params file(s), with the same DVC code that `-S` uses (comments and order are kept)."""
    if not overrides:
        return
    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    for path, items in to_path_overrides(overrides).items():
        file = Path(project) / path
        if not file.is_file():
            raise PipelineError(f"set_params: {path} does not exist in {project}")
        try:
            apply_overrides(file, items)
        except DvcException as exc:
            cause = exc.__cause__ or exc
            raise PipelineError(f"set_params {items}: {cause}") from None
        _logger().info("%s: set %s", path, ", ".join(items))


# --- one stage through DVC -------------------------------------------------------------------------

_LINE_END = re.compile(rb"(\r\n|\n|\r)")
_EXITED = re.compile(r"ERROR: failed to reproduce '[^']*': failed to run: .*, exited with (-?\d+)")
_LOCKED = ("Unable to acquire lock", "is busy, it is being blocked by")
_TRACEBACK_LAST = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))\b")
# Exceptions that a second try can fix: the OS and network family (a flaky disk, a dropped mount, a
# reset connection). Other exceptions are bugs or bad data and would fail the same way again.
TRANSIENT_EXCEPTIONS = {
    "OSError", "IOError", "EnvironmentError", "BlockingIOError", "ChildProcessError", "ConnectionError",
    "BrokenPipeError", "ConnectionAbortedError", "ConnectionRefusedError", "ConnectionResetError",
    "InterruptedError", "TimeoutError",
}


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


def stage_env() -> dict[str, str]:
    """The environment of `dvc repro`: this interpreter's bin folder first on PATH, so the `python`
    in every stage's cmd is the project's; unbuffered output, so lines reach the log as they come."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _level(line: str) -> int:
    head = line.lstrip()[:10].lower()
    if head.startswith("error") or head.startswith("traceback"):
        return logging.ERROR
    return logging.WARNING if head.startswith("warning") else logging.INFO


def _stop(proc: subprocess.Popen) -> None:
    """End `dvc repro` and the stage command under it (its own process group), gently first."""
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


def run_dvc_stage(project: str | Path, stage: str, force: bool = False, logger: Any = None) -> StageOutcome:
    """`dvc repro --single-item [--force] <stage>`, every output line logged as it comes.

    --single-item: DVC checks this stage alone against dvc.lock (the flow runs the stages in DAG
    order, so the upstream ones were checked just before).
    """
    logger = logger or _logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=400)
    # Own process group: cancelling the flow run ends the stage too, not just `dvc`.
    proc = subprocess.Popen(cmd, cwd=project, env=stage_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
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
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc)
    return classify(stage, returncode, list(tail), time.monotonic() - started)


def classify(stage: str, returncode: int, lines: list[str], seconds: float) -> StageOutcome:
    """What happened, from `dvc repro`'s exit status and output: ran / skipped / which failure."""
    if returncode == 0:
        text = "\n".join(lines)
        if f"Stage '{stage}' didn't change, skipping" in text:
            outcome = "up to date"
        elif f"Stage '{stage}' is cached - skipping run" in text:
            outcome = "restored from run cache"
        else:
            outcome = "ran"
        return StageOutcome(stage, outcome, seconds, tail=lines)
    dvc_errors = [line for line in lines if line.startswith("ERROR:")]
    if any(marker in line for line in lines for marker in _LOCKED):
        detail = " ".join(line.strip() for line in lines if not line.startswith("Running stage"))
        return StageOutcome(stage, "already running", seconds, returncode, message=f"already running: another DVC process is working on this pipeline ({detail}). Wait for it to finish, then run again.", tail=lines)
    exited = next((int(m.group(1)) for line in reversed(lines) if (m := _EXITED.search(line))), None)
    if exited is None:  # DVC itself refused (missing dependency, invalid dvc.yaml): fix, don't retry
        message = " ".join(dvc_errors) or (lines[-1] if lines else f"dvc exited with {returncode}")
        return StageOutcome(stage, "failed", seconds, returncode, message=message, tail=lines)
    stage_errors = [line.strip() for line in lines if line.lstrip().startswith("error:")]
    if exited == USER_ERROR_EXIT and stage_errors:
        return StageOutcome(stage, "failed", seconds, returncode, exited, message="\n".join(stage_errors), tail=lines)
    # Killed (no traceback: a signal, the OOM killer, a segfault) or an I/O-type exception: worth
    # another try, and a training stage resumes from its last backup. Any other exception: a bug.
    traceback_at = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), default=None)
    cause = exception = None
    if traceback_at is not None:
        cause = next((line.strip() for line in reversed(lines[traceback_at:]) if _TRACEBACK_LAST.match(line.strip())), None)
        exception = _TRACEBACK_LAST.match(cause).group(1).rsplit(".", 1)[-1] if cause else "unknown"
    message = f"stage command {_describe_exit(exited)}" + (f": {cause}" if cause else "")
    retryable = exception is None or exception in TRANSIENT_EXCEPTIONS
    return StageOutcome(stage, "failed", seconds, returncode, exited, message=message, retryable=retryable, tail=lines)


def _describe_exit(exited: int) -> str:
    """'killed by SIGKILL' whether the shell DVC runs the command in reports the signal as -9
    (it exec'd the command) or as 137 (it forked and waited), else 'exited with N'."""
    signum = -exited if exited < 0 else exited - 128 if exited > 128 else None
    try:
        return f"killed by {signal.Signals(signum).name}"
    except ValueError:
        return f"exited with {exited}"


def fresh_stages(project: str | Path, names: list[str]) -> set[str]:
    """The stages among ``names`` that `dvc status` finds unchanged (deps, params, outs all match
    dvc.lock). One DVC call instead of one `dvc repro` per stage: a run where little changed is quick.
    Empty when DVC cannot tell (another process holds its lock): then every stage goes through repro."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *names], cwd=project, env=stage_env(), capture_output=True, text=True)
    try:
        changed = json.loads(proc.stdout or "{}") if proc.returncode == 0 else None
    except json.JSONDecodeError:
        changed = None
    if not isinstance(changed, dict):
        _logger().info("dvc status could not tell what is stale; every stage goes through dvc repro")
        return set()
    return {name for name in names if name not in changed}


# --- artifacts -------------------------------------------------------------------------------------


def artifact_key(stage: str, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes: "train@s256_locked" -> "train-s256-locked-metrics"."""
    return re.sub(r"[^a-z0-9]+", "-", f"{stage}-{kind}".lower()).strip("-")


def _preview_files(project: Path, stage: StageInfo) -> list[Path]:
    found = []
    for out in stage.outs:
        path = project / out
        if path.is_file() and path.suffix.lower() in artifacts.IMAGE_SUFFIXES:
            found.append(path)
        elif path.is_dir():  # a run folder: its preview, not every image of a data folder
            found += sorted(p for p in path.glob("preview*") if p.suffix.lower() in artifacts.IMAGE_SUFFIXES)
    return found


def _metrics_files(project: Path, stage: StageInfo) -> dict[str, Path]:
    files = {m: project / m for m in stage.metrics}
    for out in stage.outs:  # a run folder declared as one output may hold its metrics.json inside
        inside = project / out / "metrics.json"
        if inside.is_file():
            files.setdefault(f"{out}/metrics.json", inside)
    return files


def publish_artifacts(project: str | Path, stage: StageInfo) -> list[str]:
    """Markdown artifacts for a stage's current outputs: metrics, curation counts, preview. Returns their keys."""
    project = Path(project)
    published = []

    def publish(kind: str, markdown: str | None, description: str) -> None:
        if markdown:
            key = artifact_key(stage.name, kind)
            create_markdown_artifact(markdown=markdown, key=key, description=description)
            published.append(key)

    publish("metrics", artifacts.metrics_markdown(stage.name, _metrics_files(project, stage)), f"{stage.name}: metrics")
    counts = [md for out in stage.outs if (md := artifacts.curation_markdown(out, project / out))]
    publish("curation", "\n\n".join(counts) if counts else None, f"{stage.name}: rows kept and rejected, with reasons")
    previews = _preview_files(project, stage)
    if previews:
        shown = previews[0].relative_to(project).as_posix()
        publish("preview", artifacts.preview_markdown(stage.name, shown, previews[0]), f"{stage.name}: {shown}")
    return published


# --- the Prefect task and the pipeline -------------------------------------------------------------


def _retry_if_transient(task, task_run, state: State) -> bool:
    failure = state.data if isinstance(state.data, StageOutcome) else None
    return bool(failure and failure.retryable)


@task(cache_policy=NO_CACHE, persist_result=False, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S, retry_jitter_factor=RETRY_JITTER, retry_condition_fn=_retry_if_transient)
def run_stage(stage: StageInfo, project: str = ".", force: bool = False, known_fresh: bool = False) -> StageRun | State:
    """Run one DVC stage (DVC decides whether it is stale) and publish its artifacts.

    ``known_fresh``: `dvc status` already found the stage unchanged and nothing upstream ran since,
    so `dvc repro` would only say so again. A failure returns a Failed state carrying the stage's own
    message: retried when transient, final at once when the stage said `error: ...` (exit 2) or
    another run holds the pipeline.
    """
    logger = _logger()
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
        published = publish_artifacts(project, stage)
    except Exception as exc:  # an unreadable output must not fail a stage that DVC finished
        logger.warning("%s: could not build artifacts: %r", stage.name, exc)
        published = []
    return StageRun(stage.name, result.outcome, round(result.seconds, 1), tuple(published))


def _run_description() -> str:
    from prefect.runtime import flow_run

    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    who = f"flow run {flow_run.name!r} ({flow_run.id}) of {flow_run.flow_name!r}" if flow_run.id else "a process"
    return f"{who}, pid {os.getpid()}, since {since}"


@contextmanager
def pipeline_lock(project: str | Path, holder: str):
    """Hold the pipeline for one run. DVC's own lock covers one `dvc` command at a time; a flow runs
    many, and writes params.yaml first, so a second run must be turned away before it starts. The
    OS releases the lock if the process dies, so a killed run never leaves it behind."""
    import zc.lockfile

    path = Path(project) / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = zc.lockfile.LockFile(str(path), content_template=holder.replace("{", "{{").replace("}", "}}"))
    except zc.lockfile.LockError:
        held_by = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
        raise PipelineError(f"already running: {held_by} is running this pipeline ({path}). Wait for it to finish or cancel it, then run again.") from None
    try:
        yield
    finally:
        lock.close()


def _summary_markdown(title: str, rows: list[dict], not_run: list[str]) -> str:
    table = artifacts.markdown_table(["stage", "outcome", "seconds"], [[r["stage"], r["outcome"], r["seconds"]] for r in rows] + [[s, "not run", ""] for s in not_run])
    return f"## {title}\n\n{table}"


def save_experiment(project: str | Path, name: str) -> None:
    """`dvc exp save -n NAME`: the workspace's params, dvc.lock and metrics as a DVC experiment, so the
    run is a row of `dvc exp show` like one made by `dvc exp run`."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-n", name], cwd=project, env=stage_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")]
        raise PipelineError(f"dvc exp save -n {name}: {' '.join(errors) or proc.stderr.strip()}")
    _logger().info("saved as DVC experiment %r (see `dvc exp show`)", name)


class _Finished:
    """The result a `_finished` state carries: an object no task ever returned or received."""


def _finished(state: State) -> State:
    """``state`` for `wait_for`, minus its result. Prefect links tasks through every object shared
    between one task's result and another's inputs (a stage name, an empty tuple), by identity; left
    alone, that draws edges DVC does not have. Hence this, and the quoted StageInfo argument."""
    return state.model_copy(update={"data": _Finished()})


def run_pipeline(
    project: str | Path = ".",
    targets: list[str] | None = None,
    set_params: list[str] | None = None,
    force: bool = False,
    upstream: bool = True,
    missing_ok: bool = False,
    experiment: str | None = None,
    title: str = "pipeline",
) -> list[dict] | State:
    """The body of every flow: lock, apply overrides, then one `run_stage` task per stage in DAG order.

    Stops at the first failed stage (what follows it is stale anyway) and returns a Failed state with
    that stage's message, so the flow run fails with the reason and no traceback. ``force`` reruns the
    stages named in ``targets`` (all when None), not the upstream ones added for them. With
    ``experiment``, a successful run is saved as that DVC experiment.
    """
    logger = _logger()
    project = Path(project).resolve()
    done: list[dict] = []
    try:
        with pipeline_lock(project, _run_description()):
            dag = read_dag(project)
            chosen = select(dag, targets, upstream=upstream, missing_ok=missing_ok)
            forced = {s.name for s in (select(dag, targets, upstream=False, missing_ok=missing_ok) if force else [])}
            apply_set_params(project, set_params)
            logger.info("stages, in order: %s", ", ".join(s.name for s in chosen))
            fresh = fresh_stages(project, [s.name for s in chosen])
            states: dict[str, State] = {}
            rerun: set[str] = set()  # stages that produced new outputs in this run
            for i, stage in enumerate(chosen):
                stage_task = run_stage.with_options(name=stage.name, task_run_name=stage.name, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S)
                # wait_for the stages whose outputs this one reads: the run graph in the UI is DVC's DAG.
                upstream_states = [_finished(states[name]) for name in stage.upstream if name in states]
                # dvc status ran before anything upstream changed: it vouches for a stage only while no
                # upstream stage has rerun since; otherwise `dvc repro` checks it again.
                known_fresh = stage.name in fresh and not rerun.intersection(stage.upstream)
                state = stage_task(quote(stage), str(project), stage.name in forced, known_fresh, wait_for=upstream_states, return_state=True)
                states[stage.name] = state
                if not state.is_completed():
                    not_run = [s.name for s in chosen[i + 1 :]]
                    failed = state.data if isinstance(state.data, StageOutcome) else None
                    done.append({"stage": stage.name, "outcome": failed.outcome if failed else state.type.value.lower(), "seconds": round(failed.seconds, 1) if failed else ""})
                    _publish_summary(title, done, not_run)
                    message = f"stage {stage.name} failed: {state.message}" + (f" (not run: {', '.join(not_run)})" if not_run else "")
                    return Failed(message=message)
                done.append(asdict(state.result()))
                if done[-1]["outcome"] != "up to date":
                    rerun.add(stage.name)
            if experiment:
                save_experiment(project, experiment)
    except PipelineError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc))
    _publish_summary(title, done, [])
    return done


def _publish_summary(title: str, rows: list[dict], not_run: list[str]) -> None:
    try:
        create_markdown_artifact(markdown=_summary_markdown(title, rows, not_run), key=artifact_key(title, "summary"), description=f"{title}: what each stage did")
    except Exception as exc:  # the summary is a convenience; the stages' own states are the record
        _logger().warning("could not publish the run summary: %r", exc)

