"""Training data streamed from the latent shards: the batches are exactly the documented order (per-domain
permutations of rows in (sha256, flipped) order, a pure function of seed and position), whatever the
shard layout, across epochs and after jumps (resume, rollback), with a bounded row-group cache; and the
shard layout is what makes one row a small read. On the taef2 codec: its latent shape and scaling."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import taef2_dir
from stagewise.codecs import CodecConfig, load_codec
from stagewise.latents import LATENT, SCHEMA, ShardWriter, from_rows, needs_relayout, read_latents, to_bytes
from stagewise.train import data as data_module
from stagewise.train.data import StageData, mix_seed

pytestmark = pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not found: set STAGEWISE_MODELS to the folder holding taef2/")
RES = 64  # taef2: 32 x 8 x 8 latents, 4 KiB a row
SHAPE = (32, RES // 8, RES // 8)
ROW_BYTES = 2 * int(np.prod(SHAPE))
PER_DOMAIN = {"a": 9, "b": 6}
HOLDOUT = 2


@pytest.fixture(scope="module")
def taef2():
    return load_codec(CodecConfig(name="taef2", weights=str(taef2_dir())))


def rows(codec_id: str) -> list[dict]:
    """Random taef2-shaped latents, both flips, written in a shuffled order (the reader must sort)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for domain, n in PER_DOMAIN.items():
        for i in range(n):
            sha = hashlib.sha256(f"{domain}{i}".encode()).hexdigest()
            for flipped in (False, True):
                latent = torch.randn(SHAPE, generator=gen) * 3 + 0.5
                out.append(dict(sha256=sha, domain=domain, resolution=RES, codec_id=codec_id, shape=list(SHAPE), latent=to_bytes(latent), flipped=flipped, caption="", fingerprint="test"))
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in order]


def write_streaming(root, codec_id: str) -> None:
    writer = ShardWriter(root, shard_bytes=10 * ROW_BYTES, row_group_bytes=3 * ROW_BYTES)  # many shards and row groups
    for row in rows(codec_id):
        writer.add(**row)
    writer.flush()


def write_old_layout(root, codec_id: str) -> None:
    """As the code before streaming wrote shards: one zstd row group per shard."""
    root.mkdir(parents=True, exist_ok=True)
    all_rows = rows(codec_id)
    for number, start in enumerate(range(0, len(all_rows), 16)):
        pq.write_table(pa.Table.from_pylist(all_rows[start : start + 16], schema=SCHEMA), root / f"shard-{number:05d}.parquet", compression="zstd")


def expected_batches(root, codec, seed: int, positions: list[int], count: int) -> dict[str, list[torch.Tensor]]:
    """The documented order, computed from all rows in memory (what StageData did before it streamed)."""
    frame = read_latents(root)
    out = {}
    for d, domain in enumerate("ab"):
        mine = frame[frame["domain"] == domain]
        held = sorted(set(mine["sha256"]))[:HOLDOUT]
        train = from_rows(mine[~mine["sha256"].isin(held)])
        n = len(train)
        stream = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, d, epoch))) for epoch in range(max(positions) // n + 2)])
        out[domain] = [codec.normalize(train[stream[p : p + count]].float()) for p in positions]
    return out


@pytest.mark.parametrize("layout", ["streaming", "old"])
def test_batches_follow_the_documented_order_across_epochs_and_jumps(tmp_path, taef2, monkeypatch, layout):
    (write_streaming if layout == "streaming" else write_old_layout)(tmp_path, taef2.id)
    if layout == "streaming":
        assert not any(needs_relayout(s) for s in tmp_path.glob("shard-*.parquet"))
        monkeypatch.setattr(data_module, "CACHE_BYTES", 2 * 3 * ROW_BYTES)  # two row groups: most reads go to disk
    data = StageData(tmp_path, taef2, RES, HOLDOUT, True, seed=7, device=torch.device("cpu"))
    count = 5
    # consecutive batches over several epochs (prefetched), then a rollback to 10 and a resume at 35
    positions = [count * k for k in range(8)] + [10, 15, 35, 40, 45]
    want = expected_batches(tmp_path, taef2, 7, positions, count)
    assert data.count("a") == 2 * (PER_DOMAIN["a"] - HOLDOUT) and data.latent_shape == SHAPE
    for k, position in enumerate(positions):
        for domain in "ab":
            got = data.batch(domain, position, count)
            assert got.dtype == torch.float32 and torch.equal(got, want[domain][k]), (layout, domain, position)
    assert data.reader._cached_bytes <= data.reader.cache_bytes
    frame = read_latents(tmp_path)
    for domain in "ab":
        mine = frame[(frame["domain"] == domain) & ~frame["flipped"]]
        shas = sorted(set(mine["sha256"]))
        assert torch.equal(data.first(domain, 64, heldout=True), taef2.normalize(from_rows(mine[mine["sha256"].isin(shas[:HOLDOUT])]).float()))
        assert torch.equal(data.first(domain, 3), taef2.normalize(from_rows(mine[mine["sha256"].isin(shas[HOLDOUT : HOLDOUT + 3])]).float()))
    data.close()


def test_layout_does_not_change_the_data_fingerprint(tmp_path, taef2):
    write_streaming(tmp_path / "new", taef2.id)
    write_old_layout(tmp_path / "old", taef2.id)
    new, old = (StageData(tmp_path / f, taef2, RES, HOLDOUT, True, 0, torch.device("cpu")) for f in ("new", "old"))
    assert new.fingerprint == old.fingerprint  # a backup made on old shards resumes on rewritten ones
    assert len(list((tmp_path / "new").glob("*.parquet"))) > len(list((tmp_path / "old").glob("*.parquet")))


def test_streaming_layout_bounds_row_groups_and_stores_latents_uncompressed(tmp_path, taef2):
    write_streaming(tmp_path / "new", taef2.id)
    write_old_layout(tmp_path / "old", taef2.id)
    column = SCHEMA.names.index(LATENT)
    for shard in sorted((tmp_path / "new").glob("shard-*.parquet")):
        meta = pq.ParquetFile(shard).metadata
        assert meta.num_row_groups > 1
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(column)
            assert meta.row_group(g).num_rows <= 3 and chunk.compression == "UNCOMPRESSED" and not chunk.is_stats_set
    assert all(needs_relayout(s) for s in (tmp_path / "old").glob("shard-*.parquet"))
