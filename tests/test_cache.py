"""The latent cache: schema, incremental encoding by content hash, caption updates without re-encoding,
pruning, flips, and a run killed mid-way that a second run completes without duplicates. All with the
real pixels codec (exact, so stored latents can be compared with the images) and real Parquet shards."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT
from stagewise.cache import CacheConfig, cache_fingerprint, update_cache
from stagewise.codecs import CodecConfig, load_codec
from stagewise.codecs.pixels import PixelCodec
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.images import center_square, load_rgb
from stagewise.latents import SCHEMA, from_rows, needs_relayout, read_index, read_latents

RES = 64  # small enough that every test here runs in about a second
ROW_BYTES = 3 * RES * RES * 2  # one pixels-codec row in float16


@pytest.fixture(scope="module")
def dataset(sample_dir, tmp_path_factory) -> pd.DataFrame:
    """What the caption stage would hand over: ingest's kept images with a caption each."""
    manifest, _ = ingest({"a": sample_dir / "a", "b": sample_dir / "b"}, IngestConfig(), tmp_path_factory.mktemp("store"))
    kept = manifest[manifest["status"] == "kept"].reset_index(drop=True)
    return kept.assign(caption="a photo of " + kept["domain"], caption_source="template")[
        ["path", "domain", "sha256", "width", "height", "caption", "caption_source"]
    ]


@pytest.fixture(scope="module")
def pixels():
    return load_codec(CodecConfig(name="pixels"))


def small(**overrides) -> CacheConfig:
    # shards of 8 rows, so that tests can see which shards were touched
    return CacheConfig(**{"batch_size": 4, "shard_mb": 8 * ROW_BYTES / 2**20, "workers": 2, **overrides})


def shard_stamps(root):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.glob("shard-*.parquet")}


def test_writes_schema_rows_and_exact_latents_with_flips(dataset, pixels, tmp_path):
    result = update_cache(dataset, tmp_path, RES, pixels, small())
    assert (result.encoded, result.images_encoded, result.reused) == (2 * len(dataset), len(dataset), 0)
    shards = sorted(tmp_path.glob("shard-*.parquet"))
    assert len(shards) == -(-2 * len(dataset) // 8)
    assert all(pq.read_schema(s).equals(SCHEMA, check_metadata=False) for s in shards)
    rows = read_latents(tmp_path)
    assert len(rows) == 2 * len(dataset) and not rows.duplicated(["sha256", "flipped"]).any()
    assert set(rows["sha256"]) == set(dataset["sha256"])
    assert (rows["resolution"] == RES).all() and (rows["codec_id"] == "pixels").all()
    assert (rows["fingerprint"] == cache_fingerprint(pixels, RES)).all()
    assert all(list(shape) == [3, RES, RES] for shape in rows["shape"])
    by_sha = dataset.set_index("sha256")
    assert (rows["caption"] == rows["sha256"].map(by_sha["caption"])).all()
    assert (rows["domain"] == rows["sha256"].map(by_sha["domain"])).all()

    first = dataset.iloc[0]
    crop = np.asarray(center_square(load_rgb(first["path"], 2**31), RES))
    for flipped, expected in ((False, crop), (True, crop[:, ::-1])):
        row = rows[(rows["sha256"] == first["sha256"]) & (rows["flipped"] == flipped)]
        stored = (from_rows(row)[0].float() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(stored, expected)


def test_adding_images_encodes_only_the_new_ones(dataset, pixels, tmp_path):
    update_cache(dataset.iloc[:-5], tmp_path, RES, pixels, small())
    result = update_cache(dataset, tmp_path, RES, pixels, small())
    assert (result.images_encoded, result.encoded, result.reused, result.pruned) == (5, 10, 2 * (len(dataset) - 5), 0)
    index = read_index(tmp_path)
    assert len(index) == 2 * len(dataset) and not index.duplicated(["sha256", "flipped"]).any()
    again = update_cache(dataset, tmp_path, RES, pixels, small())
    assert (again.encoded, again.rewritten_shards, again.new_shards) == (0, [], [])


def test_caption_change_rewrites_only_its_shards_without_encoding(dataset, pixels, tmp_path):
    update_cache(dataset, tmp_path, RES, pixels, small())
    before = shard_stamps(tmp_path)
    index = read_index(tmp_path)
    target = index.iloc[len(index) // 2]["sha256"]
    edited = dataset.assign(caption=dataset["caption"].where(dataset["sha256"] != target, "a new caption"))

    result = update_cache(edited, tmp_path, RES, pixels, small())
    assert (result.encoded, result.relabelled, result.pruned) == (0, 2, 0)
    holding = set(index.loc[index["sha256"] == target, "shard"])
    assert set(result.rewritten_shards) == holding
    after = shard_stamps(tmp_path)
    assert {n for n in before if before[n] != after[n]} == holding  # the other shards are untouched
    rows = read_latents(tmp_path)
    assert set(rows.loc[rows["sha256"] == target, "caption"]) == {"a new caption"}
    assert (rows.loc[rows["sha256"] != target, "caption"] != "a new caption").all()


def test_shards_of_the_old_layout_are_rewritten_for_streaming_without_encoding(dataset, pixels, tmp_path):
    update_cache(dataset, tmp_path, RES, pixels, small())
    before = read_latents(tmp_path)
    for shard in tmp_path.glob("shard-*.parquet"):  # as the code before streaming wrote them: one zstd row group
        pq.write_table(pq.read_table(shard), shard, compression="zstd")
        assert needs_relayout(shard)
    result = update_cache(dataset, tmp_path, RES, pixels, small())
    assert (result.encoded, result.pruned, result.relabelled) == (0, 0, 0)
    assert sorted(result.rewritten_shards) == sorted(p.name for p in tmp_path.glob("shard-*.parquet"))
    assert not any(needs_relayout(s) for s in tmp_path.glob("shard-*.parquet"))
    pd.testing.assert_frame_equal(read_latents(tmp_path), before)  # the same rows, bytes for bytes
    assert update_cache(dataset, tmp_path, RES, pixels, small()).rewritten_shards == []


def test_removed_images_and_stale_settings_are_pruned(dataset, pixels, tmp_path):
    update_cache(dataset, tmp_path, RES, pixels, small())
    gone = set(dataset["sha256"].iloc[:3])
    result = update_cache(dataset.iloc[3:], tmp_path, RES, pixels, small())
    assert (result.encoded, result.pruned) == (0, 6)
    assert set(read_index(tmp_path)["sha256"]) == set(dataset["sha256"]) - gone

    result = update_cache(dataset.iloc[3:], tmp_path, RES, pixels, small(flip=False))
    assert (result.encoded, result.pruned) == (0, len(dataset) - 3)
    assert not read_index(tmp_path)["flipped"].any()

    class PixelsV2(PixelCodec):  # a different codec id: every latent is stale
        name = "pixels-v2"

    result = update_cache(dataset.iloc[3:], tmp_path, RES, PixelsV2(CodecConfig(name="pixels")), small(flip=False))
    assert (result.encoded, result.reused, result.pruned) == (len(dataset) - 3, 0, len(dataset) - 3)
    assert set(read_index(tmp_path)["codec_id"]) == {"pixels-v2"}


def test_unreadable_or_changed_file_is_skipped_with_reason_and_retried(dataset, pixels, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    frame = dataset.iloc[:4].copy()
    for i, src in enumerate(frame["path"]):
        frame.iloc[i, frame.columns.get_loc("path")] = str(images / f"{i}.jpg")
        (images / f"{i}.jpg").write_bytes(open(src, "rb").read())
    Image.new("RGB", (80, 80), "red").save(images / "1.jpg")  # edited after ingest: sha256 no longer matches
    os.remove(images / "2.jpg")

    result = update_cache(frame, tmp_path / "cache", RES, pixels, small())
    assert result.images_encoded == 2
    assert result.failed[str(images / "1.jpg")].startswith("changed since ingest: sha256")
    assert result.failed[str(images / "2.jpg")].startswith("unreadable")
    (images / "2.jpg").write_bytes(open(dataset["path"].iloc[2], "rb").read())
    retry = update_cache(frame, tmp_path / "cache", RES, pixels, small())
    assert (retry.images_encoded, list(retry.failed)) == (1, [str(images / "1.jpg")])


def test_killed_mid_run_leaves_whole_shards_and_rerun_completes_without_duplicates(dataset, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "codec": {"name": "pixels"},
        "cache": {"batch_size": 1, "shard_mb": ROW_BYTES / 2**20, "workers": 1},  # a shard per row: slow enough to kill
    }))  # fmt: skip
    dataset.to_parquet(tmp_path / "dataset.parquet")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "stages.cache", "--resolution", str(RES), "--dataset", str(tmp_path / "dataset.parquet"),
           "--out", str(out), "--params", str(tmp_path / "params.yaml")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob("shard-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]

    survived = read_index(out)  # every shard on disk is whole and readable
    assert 0 < len(survived) < 2 * len(dataset)
    (out / ".shard-99999.parquet.tmp-1-deadbeef").write_bytes(b"half a shard")  # as a kill during a write leaves

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"encoded {2 * len(dataset) - len(survived)} rows" in done.stderr
    assert f"reused {len(survived)}" in done.stderr
    index = read_index(out)
    assert len(index) == 2 * len(dataset) and not index.duplicated(["sha256", "flipped"]).any()
    assert not list(out.glob(".*tmp*"))


def test_stage_reports_a_missing_dataset_clearly(tmp_path, capsys):
    from stages import cache as cache_stage
    from stagewise import cli

    (tmp_path / "params.yaml").write_text("codec: {name: pixels}\n")
    argv = ["--resolution", "64", "--dataset", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "cache"),
            "--params", str(tmp_path / "params.yaml")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.run(cache_stage.main, cache_stage.build_parser(), argv)
    assert exit_.value.code == 2
    assert f"error: {tmp_path / 'nope.parquet'}: not found; run the caption stage first" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
