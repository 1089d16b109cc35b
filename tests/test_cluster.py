"""Curation on a Dask cluster (stagewise.cluster): a 2-worker LocalCluster on 127.0.0.1, started once for
the module, computes ingest's decodes, the watermark detector, near_dup's hashes, the TAEF2 latent cache of a tiny
project, and the model steps (captioner, vlm_filter) on tiny random models;
every output file is byte-identical to the local run's. A worker that dies mid-shard is reported with its
shard and the shard retried once; one that dies twice fails the stage naming the shard, keeps what the
other shards finished, and the rerun computes only the rest. An unreachable address fails in seconds,
naming it and how to start a local cluster."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import skimage.data
import yaml
from PIL import Image

from conftest import ROOT, taef2_dir
from stagewise.cluster import Cluster, ClusterConfig, ClusterError, activate
from stagewise.config import ParamsError, parse_section
from stagewise.io import read_parquet_dir, write_parquet
from test_memo_map import mean_red, photos

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread, bound to 127.0.0.1; tiny shards so every map has several."""
    started = Cluster(ClusterConfig(engine="dask", workers=2, threads_per_worker=1, shard_images=3))
    started.client()
    yield started
    started.close()


def test_cluster_section_is_typed_and_strict():
    assert parse_section(None, ClusterConfig, "cluster").engine == "local"  # no section: no service needed
    with pytest.raises(ParamsError, match=r"cluster.engine"):
        parse_section({"engine": "ray"}, ClusterConfig, "cluster")
    with pytest.raises(ParamsError, match=r"cluster.address: .*tcp://"):
        parse_section({"address": "127.0.0.1:8786"}, ClusterConfig, "cluster")
    with pytest.raises(ParamsError, match=r"cluster.worker: unknown key; allowed keys: .*workers"):
        parse_section({"worker": 2}, ClusterConfig, "cluster")


def domain_folders(root: Path) -> dict[str, Path]:
    """Two domains of real photo crops (one with printed text, for the detector) and a broken file."""
    photos_ = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea()}
    folders = {}
    for domain, names in {"a": ["astronaut", "coffee"], "b": ["chelsea", "coffee"]}.items():
        folder = root / domain
        folder.mkdir(parents=True)
        for name in names:
            img = photos_[name]
            for i in range(2):
                crop = img[i * 40 : i * 40 + 200, i * 50 : i * 50 + 200]
                Image.fromarray(crop).save(folder / f"{domain}_{name}_{i}.png")
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
        folders[domain] = folder
    return folders


def curate(folders: dict[str, Path], work: Path, cluster: Cluster | None) -> list[Path]:
    """ingest -> watermark -> near_dup -> cache@32 (TAEF2) in this process, on ``cluster`` or locally; the output files."""
    from stagewise.cache import CacheConfig, update_cache
    from stagewise.codecs import CodecConfig, load_codec
    from stagewise.curation.ingest import IngestConfig, ingest
    from stagewise.curation.neardup import NearDupConfig, find_near_duplicates
    from stagewise.curation.watermark import WatermarkConfig, run_cascade

    with activate(cluster):
        manifest, _ = ingest(folders, IngestConfig(workers=2), work / "store" / "ingest")
        write_parquet(work / "manifest.parquet", manifest)
        decisions, counts = run_cascade(manifest, WatermarkConfig(workers=1), work / "store" / "watermark")
        assert counts["detected"] > 0
        write_parquet(work / "watermark.parquet", decisions)
        near, counts = find_near_duplicates(manifest, NearDupConfig(workers=1), work / "store" / "near_dup", {"watermark.parquet": decisions})
        assert counts["hashed"] > 0
        write_parquet(work / "near_dup.parquet", near)
        kept = manifest[manifest["status"] == "kept"].assign(caption="a photo")
        codec = load_codec(CodecConfig(name="taef2", weights=str(taef2_dir())))
        result = update_cache(kept, work / "cache", 32, codec, CacheConfig(resolutions=[32], batch_size=4, shard_mb=0.006, workers=2))
        assert result.encoded == 2 * len(kept) and len(result.new_shards) > 1
    return [work / "manifest.parquet", work / "watermark.parquet", work / "near_dup.parquet", *sorted((work / "cache").glob("shard-*.parquet"))]


@pytest.mark.skipif(taef2_dir() is None, reason="needs the bundled TAEF2 weights (STAGEWISE_MODELS)")
def test_two_workers_give_the_same_bytes_as_a_local_run(cluster, tmp_path):
    folders = domain_folders(tmp_path / "in")
    local = curate(folders, tmp_path / "local", None)
    on_cluster = curate(folders, tmp_path / "cluster", cluster)
    assert [p.name for p in local] == [p.name for p in on_cluster]
    for mine, theirs in zip(local, on_cluster):
        assert mine.read_bytes() == theirs.read_bytes(), f"{mine.name} differs between the local and the cluster run"
    # the workers wrote the memo store (parts from their own pids), not this process
    parts = list((tmp_path / "cluster" / "store" / "watermark").glob("part-*.parquet"))
    workers = {str(pid) for pid in cluster.client().run(os.getpid).values()}
    assert parts and {p.stem.rsplit("-", 1)[-1] for p in parts} <= workers


def test_model_steps_caption_and_vlm_filter_run_on_the_workers_and_match_a_local_run(cluster, tmp_path):
    """The steps that run a model: the transformers captioner (tiny random BLIP) and vlm_filter (tiny
    random BLIP VQA), both from_pretrained. On the cluster the model is built on the workers (its ``Lazy``
    travels as a recipe), never in this process, and the frames equal the local run's."""
    from stagewise.curation.caption import CaptionConfig, caption_dataset, make_captioner
    from stagewise.curation.ingest import IngestConfig, ingest
    from stagewise.curation.vlm import VlmConfig, filter_images
    from tiny_models import tiny_blip

    manifest, _ = ingest(domain_folders(tmp_path / "in"), IngestConfig(), tmp_path / "ingest")
    caption_cfg = CaptionConfig(captioner="transformers", model=str(tiny_blip(tmp_path / "blip", task="caption")), batch_size=2, max_new_tokens=8)
    vlm_cfg = VlmConfig(model=str(tiny_blip(tmp_path / "vqa")), questions=[{"text": "is there a watermark?", "reject": ["nothing-says-this"]}], batch_size=2)
    runs = {}
    for where, on in (("local", None), ("cluster", cluster)):
        captioner = make_captioner(caption_cfg)
        with activate(on):
            captions, counts = caption_dataset(manifest, {}, captioner, tmp_path / where / "caption", caption_cfg.batch_size, workers=1)
            decisions, asked = filter_images(manifest, vlm_cfg, tmp_path / where / "vlm")
        runs[where] = captions, decisions
        kept = int((manifest["status"] == "kept").sum())
        assert counts["captioned"] == kept and asked == kept and kept >= 6
        assert (captioner._lazy.value is None) == (where == "cluster"), f"{where}: the captioner was (not) built in this process"
    pd.testing.assert_frame_equal(runs["local"][0], runs["cluster"][0])
    pd.testing.assert_frame_equal(runs["local"][1], runs["cluster"][1])
    assert runs["cluster"][0]["caption"].str.len().gt(0).all()
    workers = {str(pid) for pid in cluster.client().run(os.getpid).values()}
    for step in ("caption", "vlm"):
        parts = list((tmp_path / "cluster" / step).glob("part-*.parquet"))
        assert parts and {p.stem.rsplit("-", 1)[-1] for p in parts} <= workers, f"{step}: not written by the workers"


def die_on(marker_dir: Path, victim: str, times: int):
    """A memo_map load that kills its worker process on ``victim`` the first ``times`` times it meets it."""

    def load(row):
        if Path(row.path).name == victim:
            deaths = len(list(marker_dir.glob("death-*")))
            if deaths < times:
                (marker_dir / f"death-{deaths}").touch()
                os._exit(17)  # a worker process dying mid-shard, as under the OOM killer
        return mean_red(row)

    return load


def test_a_worker_dying_mid_shard_is_reported_and_its_shard_retried_once(cluster, tmp_path, caplog):
    from stagewise.store import ResultStore, memo_map

    rows = photos(tmp_path / "in", 9)  # three shards of three
    expected = memo_map(rows, ResultStore(tmp_path / "local", "fp"), mean_red).values
    store = ResultStore(tmp_path / "store", "fp", flush_every=1)
    with caplog.at_level(logging.WARNING, logger="stagewise.cluster"):
        got = memo_map(rows, store, die_on(tmp_path, "img_04.png", times=1), cluster=cluster, desc="redness")
    assert got.values == expected and list(got.values) == list(expected) and got.computed == 9
    [report] = [r.getMessage() for r in caplog.records if "retrying the shard once" in r.getMessage()]
    assert "shard 2/3 of redness (3 images" in report and "img_03.png .. " in report and "img_05.png" in report


def test_a_shard_losing_its_worker_twice_fails_and_the_rerun_finishes_it(cluster, tmp_path):
    from stagewise.store import ResultStore, memo_map

    rows = photos(tmp_path / "in", 9)
    store = ResultStore(tmp_path / "store", "fp", flush_every=1)
    with pytest.raises(ClusterError, match=r"shard 3/3 of redness \(3 images, .*img_06.png .* lost its worker twice"):
        memo_map(rows, store, die_on(tmp_path, "img_07.png", times=2), cluster=cluster, desc="redness")
    # every other shard finished and is in the store (the killed shard at most up to its kill)
    saved = set(read_parquet_dir(tmp_path / "store")["sha256"])
    assert {r.sha256 for r in rows[:6]} <= saved and rows[7].sha256 not in saved
    computed = []
    rerun = memo_map(rows, store, lambda row: computed.append(Path(row.path).name) or mean_red(row))
    assert set(computed) == {r.path.rsplit("/", 1)[-1] for r in rows if r.sha256 not in saved} <= {"img_06.png", "img_07.png", "img_08.png"}
    assert len(rerun.values) == 9 and "img_07.png" in computed


def test_an_unreachable_address_fails_fast_naming_it(tmp_path):
    """Through a real stage process: the cluster section is read by stagewise.cli.run for every stage."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"cluster": {"engine": "dask", "address": "tcp://127.0.0.1:9", "connect_timeout_s": 2}}))
    photos(tmp_path / "a", 2)
    photos(tmp_path / "b", 2, start=2)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--domain", "a=a", "--domain", "b=b", "--out", "manifest.parquet", "--store", "store", "--params", "params.yaml"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster.address: no Dask scheduler answered at tcp://127.0.0.1:9 within 2 s" in proc.stderr
    assert "make cluster" in proc.stderr and "cluster.address: null" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "manifest.parquet").exists()
    assert took < 30, f"took {took:.0f} s to give up"


def test_a_stage_process_connects_to_the_address(cluster, tmp_path):
    """`cluster.address` of a running scheduler: the stage's new images are computed on its workers."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"cluster": {"engine": "dask", "address": cluster.address, "shard_images": 2}}))
    photos(tmp_path / "a", 3)
    photos(tmp_path / "b", 3, start=3)
    for folder in ("a", "b"):  # ingest's min_side_px is 64
        for p in (tmp_path / folder).iterdir():
            Image.open(p).resize((96, 72)).save(p)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--domain", "a=a", "--domain", "b=b", "--out", "manifest.parquet", "--store", "store", "--params", "params.yaml"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cluster: connected to {cluster.address}" in proc.stderr
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert (manifest["status"] == "kept").sum() == 6, manifest["reason"].tolist()
    parts = list((tmp_path / "store").glob("part-*.parquet"))
    workers = {str(pid) for pid in cluster.client().run(os.getpid).values()}
    assert parts and {p.stem.rsplit("-", 1)[-1] for p in parts} <= workers  # written by the workers


@pytest.mark.slow
@pytest.mark.skipif(taef2_dir() is None, reason="needs the bundled TAEF2 weights (STAGEWISE_MODELS)")
def test_dvc_repro_through_the_cache_on_a_local_cluster_is_byte_identical(tmp_path):
    """The acceptance run: `dvc repro cache@16` (TAEF2) of the tiny project, once local and once with
    `cluster: {engine: dask, address: null, workers: 2}` (each stage with new images starts its own
    LocalCluster on 127.0.0.1); every curated output and latent shard has the same bytes."""
    from conftest import dvc, set_params
    from tiny_pipeline import make_tiny_project

    projects = {}
    for name in ("local", "dask"):
        project = make_tiny_project(tmp_path / name, sample=name == "local")
        set_params(project / "params.yaml", {"codec": {"name": "taef2", "weights": str(taef2_dir())}})
        if name == "dask":
            shutil.copytree(projects["local"] / "data" / "sample", project / "data" / "sample")  # same files, same mtimes
            set_params(project / "params.yaml", {"cluster": {"engine": "dask", "workers": 2, "shard_images": 4}})
        repro = dvc(project, "repro", "cache@16")
        assert name == "local" or "cluster: started a local Dask cluster at tcp://127.0.0.1:" in repro.stdout + repro.stderr
        projects[name] = project
    outputs = sorted(p.relative_to(projects["local"]) for p in (projects["local"] / "data").glob("c*/**/*.parquet"))
    assert any("cache/16/shard-" in str(p) for p in outputs) and any("manifest" in str(p) for p in outputs)
    for rel in outputs:
        assert (projects["local"] / rel).read_bytes() == (projects["dask"] / rel).read_bytes(), rel
