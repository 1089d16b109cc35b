"""The `progressive-train` flow: every stage of the DVC pipeline, one Prefect task each, in DAG order.

DVC decides what is stale (each task reproduces one stage through DVC's Python API); this flow only composes.
Deployed as `progressive-train/default` (prefect.yaml). Run it without a server too:
`python -m flows.progressive_train --stage train@lrd --set-param ++train.stages.lrd.lr=2e-5`.
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.pipeline import run_pipeline


@flow(name="progressive-train", persist_result=False)
def progressive_train(
    stages: list[str] | None = None,
    set_params: list[str] | None = None,
    force: bool = False,
    upstream: bool = True,
    experiment: str | None = None,
    project_dir: str = ".",
):
    """Curate, cache and train through the whole recipe; only what DVC finds stale runs.

    Args:
        stages: stage names, foreach groups or globs to run (e.g. ["train@lrd"], ["train"]); all when empty.
        set_params: `dvc exp run -S` style overrides written into params.yaml first, e.g. ["++train.stages.lrd.lr=2e-5"].
        force: rerun the selected stages even if DVC finds them up to date.
        upstream: also run what the selected stages depend on (DVC skips what is up to date).
        experiment: save the finished run as this DVC experiment (`dvc exp save -n`), for `dvc exp show`.
        project_dir: the DVC project; the deployment's working directory by default.
    """
    return run_pipeline(project_dir, targets=stages or None, set_params=set_params, force=force, upstream=upstream, experiment=experiment, title="progressive-train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", action="append", dest="stages", metavar="NAME", help="stage, foreach group or glob to run; repeat for more (default: all)")
    parser.add_argument("--set-param", "-S", action="append", dest="set_params", metavar="KEY=VALUE", help="params.yaml override, as `dvc exp run -S`; repeatable")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")
    parser.add_argument("--no-upstream", dest="upstream", action="store_false", help="run only the selected stages, not what they depend on")
    parser.add_argument("--experiment", metavar="NAME", help="save the finished run as this DVC experiment")
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
    args = parser.parse_args()
    state = progressive_train(**vars(args), return_state=True)
    raise SystemExit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()
