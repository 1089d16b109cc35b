"""The `curate` flow: the curation half of the pipeline, from raw folders to the latent cache.

Runs the curation stages that this pipeline has (domains, ingest, watermark, near_dup, vlm_filter,
caption, cache@<res>) and whatever they depend on, in DAG order, one Prefect task per DVC stage. Deployed as
`curate/default`.
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.dvc_tasks import run_pipeline

# Stage names (or foreach groups) of the curation half; those the pipeline lacks are skipped. A curation
# stage added later between these runs too, unlisted: it is upstream of `caption` or `cache`.
CURATION_STAGES = ["domains", "ingest", "watermark", "near_dup", "vlm_filter", "caption", "cache"]


@flow(name="curate", persist_result=False)
def curate(set_params: list[str] | None = None, force: bool = False, project_dir: str = "."):
    """Curate the domain folders into a captioned dataset and cache its latents.

    Args:
        set_params: `dvc exp run -S` style overrides written into params.yaml first, e.g. ["watermark.threshold=0.2"].
        force: rerun every curation stage even if DVC finds it up to date.
        project_dir: the DVC project; the deployment's working directory by default.
    """
    return run_pipeline(project_dir, targets=CURATION_STAGES, set_params=set_params, force=force, missing_ok=True, title="curate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set-param", "-S", action="append", dest="set_params", metavar="KEY=VALUE", help="params.yaml override, as `dvc exp run -S`; repeatable")
    parser.add_argument("--force", action="store_true", help="rerun every curation stage even if up to date")
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
    args = parser.parse_args()
    state = curate(**vars(args), return_state=True)
    raise SystemExit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()
