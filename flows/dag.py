"""The pipeline as DVC declares it: its stages in DAG order, a selection of them, and which are stale.

Everything here is asked of DVC's Python API (`dvc.repo.Repo`: its index graph and `status`); no
stage name of this project's pipeline is written here, so the flows follow whatever dvc.yaml holds.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path


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
    error listing the known ones, unless ``missing_ok`` (for callers that name stages a pipeline may
    not have).
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


def unchanged_stages(project: str | Path, names: list[str]) -> set[str] | None:
    """The stages among ``names`` that DVC's `status` finds unchanged (deps, params, outs all match
    dvc.lock): one call instead of starting `dvc repro` per stage, so a run where little changed is
    quick. None when DVC cannot tell (another process holds its lock): then every stage is reproduced."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    if not names:
        return set()
    try:
        with Repo(str(project)) as repo:
            # DVC resolves a target, and names a stage in its answer, relative to the current
            # directory, which need not be the project: hence absolute targets, and the answer
            # looked up by the stages DVC collected for each.
            targets = {name: _absolute_target(repo.root_dir, name) for name in names}
            changed = repo.status(targets=list(targets.values()))
            return {name for name, target in targets.items() if not any(s.addressing in changed for s in repo.stage.collect(target))}
    except DvcException:
        return None


def _absolute_target(root: str, address: str) -> str:
    """"train@lrd" -> "/project/dvc.yaml:train@lrd"; "sub/dvc.yaml:x" -> "/project/sub/dvc.yaml:x"."""
    return os.path.join(root, address if ":" in address else f"dvc.yaml:{address}")
