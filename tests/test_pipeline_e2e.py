"""End to end: real `dvc repro` through sample -> ingest -> watermark -> caption -> cache@128/256/512 in a
fresh git + DVC repo, then a second `dvc repro` that does nothing, then a caption change that DVC
reruns without re-encoding a single image."""

import json
import re

import pandas as pd
import pytest

from conftest import dvc, make_project, set_params, taef2_dir
from stagewise.latents import read_latents

RESOLUTIONS = (128, 256, 512)
CACHE_STAGES = [f"cache@{res}" for res in RESOLUTIONS]  # targets, so later stages (training) are not run here


def check_curation(project) -> pd.DataFrame:
    """Every injected defect rejected with a reason; the dataset is exactly the clean crops."""
    defects = json.loads((project / "data/sample/defects.json").read_text())
    manifest = pd.read_parquet(project / "data/curated/manifest.parquet").set_index("path")
    # With align on (the demo's default) the filters see face crops: name each row by its source photo
    # (the sample's crops hold one face each, so the map is one to one).
    faces = pd.read_parquet(project / "data/curated/faces.parquet")
    source_of = dict(zip(faces["path"], faces["source_path"] if "source_path" in faces else faces["path"]))
    assert (faces.loc[faces["status"] == "kept", "source_path"].value_counts() == 1).all() if "source_path" in faces else True
    watermark = pd.read_parquet(project / "data/curated/watermark.parquet")
    watermark = watermark.set_index(watermark["path"].map(source_of))
    dataset = pd.read_parquet(project / "data/curated/dataset.parquet")
    dataset = dataset.assign(path=dataset["path"].map(source_of))
    for kind, paths in defects.items():
        for rel in paths:
            path = f"data/sample/{rel}"
            if kind == "watermark":  # decodes fine, so ingest keeps it and the watermark stage rejects it
                assert manifest.loc[path, "status"] == "kept"
                assert watermark.loc[path, "status"] == "rejected" and watermark.loc[path, "reason"].startswith("watermark"), path
            else:
                assert manifest.loc[path, "status"] == "rejected" and manifest.loc[path, "reason"], path
    defect_paths = {f"data/sample/{p}" for paths in defects.values() for p in paths}
    clean = {p for p in manifest.index if p not in defect_paths}
    assert (manifest.loc[sorted(clean), "status"] == "kept").all() and (watermark.loc[sorted(clean), "status"] == "kept").all()
    assert dataset["path"].is_unique and set(dataset["path"]) <= clean  # later filters may drop more, never a defect
    assert len(dataset) > 0
    return dataset


def check_latents(project, dataset, channels: int, factor: int) -> dict[int, pd.DataFrame]:
    out = {}
    for res in RESOLUTIONS:
        rows = read_latents(project / f"data/cache/{res}")
        assert len(rows) == 2 * len(dataset) and not rows.duplicated(["sha256", "flipped"]).any()
        assert set(rows["sha256"]) == set(dataset["sha256"])
        assert all(list(s) == [channels, res // factor, res // factor] for s in rows["shape"])
        by_sha = dataset.set_index("sha256")
        assert rows["caption"].tolist() == rows["sha256"].map(by_sha["caption"]).tolist()
        assert rows["domain"].tolist() == rows["sha256"].map(by_sha["domain"]).tolist()
        out[res] = rows
    return out


@pytest.mark.parametrize(
    "codec",
    [
        "pixels",
        pytest.param("taef2", marks=[pytest.mark.slow, pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not found")]),
    ],
)
def test_dvc_repro_through_cache_is_complete_then_idle_then_incremental(tmp_path, codec, monkeypatch):
    if codec == "taef2":
        monkeypatch.setenv("STAGEWISE_MODELS", str(taef2_dir().parent))
    # 6 crops per domain: the fewest the sample's defects are made from (duplicate of #4, tiny from #5)
    project = make_project(tmp_path / "project", {"sample": {"crops_per_domain": 6}, "codec": {"name": codec}})
    dvc(project, "repro", *CACHE_STAGES)

    dataset = check_curation(project)
    channels, factor = (3, 1) if codec == "pixels" else (32, 8)
    latents = check_latents(project, dataset, channels, factor)

    again = dvc(project, "repro", *CACHE_STAGES)
    assert "Running stage" not in again.stdout + again.stderr
    status = dvc(project, "status", "--with-deps", *CACHE_STAGES)
    assert "Data and pipelines are up to date." in status.stdout

    # A new caption template: DVC reruns caption and every cache stage, which only relabel rows.
    set_params(project / "params.yaml", {"caption": {"template": "a close-up portrait from set {domain}"}})
    rerun = dvc(project, "repro", *CACHE_STAGES)
    log = rerun.stdout + rerun.stderr
    assert len(re.findall(r"encoded 0 rows \(0 images\), reused (\d+)", log)) == len(RESOLUTIONS), log[-3000:]
    recaptioned = pd.read_parquet(project / "data/curated/dataset.parquet")
    assert recaptioned["caption"].str.startswith("a close-up portrait from set").sum() == len(dataset) - 2  # 2 sidecars win
    relabelled = check_latents(project, recaptioned, channels, factor)  # captions in the cache follow the dataset
    for res in RESOLUTIONS:
        assert relabelled[res]["latent"].tolist() == latents[res]["latent"].tolist()  # same bytes: nothing re-encoded
    assert "Data and pipelines are up to date." in dvc(project, "status", "--with-deps", *CACHE_STAGES).stdout
