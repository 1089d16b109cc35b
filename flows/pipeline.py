"""The body of every flow: hold the pipeline, apply overrides, run one `run_stage` task per DVC stage.

DVC alone decides what is stale. A run starts with one DVC status over the selected stages; then each
task reproduces its stage (flows/stage_run.py), which DVC skips when its deps, params and outs still
match dvc.lock -- unless the status already found the stage unchanged and nothing upstream of it has
rerun since (then asking DVC again would only get the same answer). Parameter overrides are written
into params.yaml with DVC's own `--set-param` code (what `dvc exp run -S` does), so params.yaml and
dvc.lock stay the record of what produced the outputs, and `dvc params diff` / `dvc exp show` see them.

The flows only compose `run_pipeline`; nothing here knows the stage names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State
from prefect.utilities.annotations import quote

from flows import artifacts
from flows.dag import PipelineError, read_dag, select, unchanged_stages
from flows.stage_run import StageOutcome, run_logger, stage_env, stage_task

LOCK_NAME = "stagewise-pipeline.lock"  # in .dvc/tmp: per repository, never committed


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
        run_logger().info("%s: set %s", path, ", ".join(items))


def _run_description() -> str:
    from prefect.runtime import flow_run

    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    who = f"flow run {flow_run.name!r} ({flow_run.id}) of {flow_run.flow_name!r}" if flow_run.id else "a process"
    return f"{who}, pid {os.getpid()}, since {since}"


@contextmanager
def pipeline_lock(project: str | Path, holder: str):
    """Hold the pipeline for one run. DVC's own lock covers one DVC call at a time; a flow makes
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


def save_experiment(project: str | Path, name: str) -> None:
    """`dvc exp save -n NAME`: the workspace's params, dvc.lock and metrics as a DVC experiment, so the
    run is a row of `dvc exp show` like one made by `dvc exp run`. A command in the project, not a
    call here: DVC's experiments take the workspace from the current directory."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-n", name], cwd=project, env=stage_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"dvc exp save -n {name} exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    run_logger().info("saved as DVC experiment %r (see `dvc exp show`)", name)


class _Finished:
    """The result a `_finished` state carries: an object no task ever returned or received."""


def _finished(state: State) -> State:
    """``state`` for `wait_for`, minus its result. Prefect links tasks through every object shared
    between one task's result and another's inputs (a stage name, an empty tuple), by identity; left
    alone, that draws edges DVC does not have. Hence this, and the quoted StageInfo argument."""
    return state.model_copy(update={"data": _Finished()})


def cluster_line(project: Path) -> str:
    """Where the per-image stages compute (params.yaml `cluster`, read by each stage process itself)."""
    from stagewise.cluster import config_from_params

    try:
        cfg = config_from_params(project / "params.yaml")
    except ValueError as exc:  # the stages will fail on it, naming the key
        return f"cluster: {exc}"
    if cfg.engine == "local":
        return "cluster: local (each stage computes in its own process)"
    where = cfg.address or f"a local Dask cluster of {cfg.workers} workers x {cfg.threads_per_worker} thread(s) on 127.0.0.1, started by each stage with new images"
    return f"cluster: dask at {where}, shards of {cfg.shard_images} images"


def run_pipeline(
    project: str | Path = ".",
    targets: list[str] | None = None,
    set_params: list[str] | None = None,
    force: bool = False,
    upstream: bool = True,
    force_upstream: bool = False,
    experiment: str | None = None,
    title: str = "pipeline",
) -> list[dict] | State:
    """Lock, apply overrides, then one `run_stage` task per stage in DAG order.

    Stops at the first failed stage (what follows it is stale anyway) and returns a Failed state with
    that stage's message, so the flow run fails with the reason and no traceback. ``force`` reruns the
    stages named in ``targets`` (all when None), and the upstream ones added for them only with
    ``force_upstream``. With
    ``experiment``, a successful run is saved as that DVC experiment.
    """
    logger = run_logger()
    project = Path(project).resolve()
    done: list[dict] = []
    try:
        with pipeline_lock(project, _run_description()):
            dag = read_dag(project)
            chosen = select(dag, targets, upstream=upstream)
            forced = {s.name for s in (select(dag, targets, upstream=force_upstream) if force else [])}
            apply_set_params(project, set_params)
            logger.info("stages, in order: %s", ", ".join(s.name for s in chosen))
            logger.info("%s", cluster_line(project))
            fresh = unchanged_stages(project, [s.name for s in chosen])
            if fresh is None:
                logger.info("DVC could not tell what is stale (its lock is held); every stage is reproduced")
            states: dict[str, State] = {}
            rerun: set[str] = set()  # stages that produced new outputs in this run
            for i, stage in enumerate(chosen):
                # wait_for the stages whose outputs this one reads: the run graph in the UI is DVC's DAG.
                upstream_states = [_finished(states[name]) for name in stage.upstream if name in states]
                # The status was taken before anything upstream changed: it vouches for a stage only
                # while no upstream stage has rerun since; otherwise DVC checks it again.
                known_fresh = stage.name in (fresh or ()) and not rerun.intersection(stage.upstream)
                state = stage_task(stage.name)(quote(stage), str(project), stage.name in forced, known_fresh, wait_for=upstream_states, return_state=True)
                states[stage.name] = state
                if not state.is_completed():
                    not_run = [s.name for s in chosen[i + 1 :]]
                    failed = state.data if isinstance(state.data, StageOutcome) else None
                    done.append(failed.row() if failed else {"stage": stage.name, "outcome": state.type.value.lower(), "seconds": ""})
                    _publish_summary(title, done, not_run)
                    message = f"stage {stage.name} failed: {state.message}" + (f" (not run: {', '.join(not_run)})" if not_run else "")
                    return Failed(message=message)
                result: StageOutcome = state.result()
                done.append(result.row())
                if result.outcome != "up to date":
                    rerun.add(stage.name)
            if experiment:
                save_experiment(project, experiment)
    except PipelineError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc))
    _publish_summary(title, done, [])
    return done


def _summary_markdown(title: str, rows: list[dict], not_run: list[str]) -> str:
    table = artifacts.markdown_table(["stage", "outcome", "seconds"], [[r["stage"], r["outcome"], r["seconds"]] for r in rows] + [[s, "not run", ""] for s in not_run])
    return f"## {title}\n\n{table}"


def _publish_summary(title: str, rows: list[dict], not_run: list[str]) -> None:
    try:
        create_markdown_artifact(markdown=_summary_markdown(title, rows, not_run), key=artifacts.artifact_key(title, "summary"), description=f"{title}: what each stage did")
    except Exception as exc:  # the summary is a convenience; the stages' own states are the record
        run_logger().warning("could not publish the run summary: %r", exc)
