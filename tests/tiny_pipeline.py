"""The project's own pipeline at its smallest: every stage of dvc.yaml runs, in seconds each.

Used by the orchestration tests (test_flows.py, test_dvc_ops.py), which need the whole DAG -- curation,
cache, init, a recipe with `lrd` in the middle, report -- but not a model worth looking at.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import make_project

TINY_PARAMS = {
    # 6 crops per domain: the fewest the sample's defects are made from (duplicate of #4, tiny from #5)
    "sample": {"crops_per_domain": 6},
    "codec": {"name": "pixels"},  # no weights, no encoder time
    "cache": {"resolutions": [16]},  # one resolution: the recipe below does not grow
    "model": {"resolution_px": 16, "bottleneck_px": 4, "channel_base": 64, "channel_max": 16, "channel_min": 8, "ae_dims": 32},
}
TINY_DEFAULTS = {"batch_size": 4, "lr": 0.002, "log_every_kimg": 0.008, "save_every_kimg": 0.016, "holdout_per_domain": 1, "preview_rows": 1}
# Two stages, so editing lrd has something downstream (gan, then report) and something upstream (init,
# the cache and all curation) that must not rerun.
TINY_RECIPE = {
    # lr written in the stage itself, so `-S train.stages.lrd.lr=...` overrides it (a key inherited from
    # train.defaults needs `-S ++train.stages.lrd.lr=...`, Hydra's add-or-override).
    "lrd": {"parent": "init", "resolution_px": 16, "length_kimg": 0.016, "lr_dropout": 0.3, "lr": 0.002},
    "gan": {"parent": "lrd", "resolution_px": 16, "length_kimg": 0.016, "gan_power": 0.1},
}


def make_tiny_project(dest: Path, sample: bool = True) -> Path:
    """A fresh git + DVC copy of the pipeline with the tiny settings; the recipe is replaced, not merged."""
    project = make_project(dest, TINY_PARAMS, sample=sample)
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train"]["defaults"] = TINY_DEFAULTS
    params["train"]["stages"] = TINY_RECIPE
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return project
