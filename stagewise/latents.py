"""The latent cache on disk: Parquet shards of bounded size, one row per (image, flip) at one resolution.

Row: sha256, domain, resolution, codec_id, shape [C, H, W], latent (raw codec output as little-endian
float16 bytes, C order), flipped, caption, fingerprint (of the settings that produced the latent).
Shards are written to a temporary name and renamed into place, so a killed run leaves whole shards.

Layout, for training's random access (``ShardReader``): row groups of about ``ROW_GROUP_BYTES`` of latents
and an uncompressed, dictionary- and statistics-free ``latent`` column, so one row costs one small read
of one row group, not a decompression of the whole shard (float16 latents barely compress: zstd saves
about 8 % on them). The layout is not part of any fingerprint: shards written by older code (one
zstd row group per shard) are read correctly, only more slowly, and the cache stage rewrites them
(``needs_relayout``) without re-encoding.

For flip augmentation use the ``flipped`` rows (cache.flip): mirroring a TAEF2 latent is NOT the latent
of the mirrored image (it decodes to 16-22 dB against the mirrored photo, vs 29-32 dB for a real encode).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stagewise.io import atomic_path

SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("domain", pa.string()),
        ("resolution", pa.int32()),
        ("codec_id", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("latent", pa.binary()),
        ("flipped", pa.bool_()),
        ("caption", pa.string()),
        ("fingerprint", pa.string()),
        # Faces: the crop's masks at latent size, uint8 (2, H, W): face hull, eyes + mouth; null without align
        ("mask", pa.binary()),
    ]
)
SHARD_GLOB = "shard-*.parquet"
# Latent bytes per row group: 1 MiB is 4 rows at 512 px (taef2, 256 KiB a row), 64 at 128 px. A random
# row then reads at most 1 MiB; measured on a 64 MiB shard (2-core CPU) a 1 MiB group reads in about
# 0.5-1 ms, a 4 MiB one in 2.5-3.5 ms, while the old single zstd group took 450-600 ms. Smaller groups
# add footer bytes (about 140 bytes per column and group) for no faster reads.
ROW_GROUP_BYTES = 1 << 20
LATENT = "latent"
MASK = "mask"
INDEX_COLUMNS = [n for n in SCHEMA.names if n not in (LATENT, MASK)]  # what an index holds: no per-pixel bytes


def to_bytes(latent: torch.Tensor) -> bytes:
    return latent.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2", copy=False).tobytes()


def from_rows(frame: pd.DataFrame) -> torch.Tensor:
    """Stack the ``latent`` column of rows that share one shape into a float16 tensor (N, C, H, W)."""
    if frame.empty:
        raise ValueError("no latent rows")
    shapes = {tuple(s) for s in frame["shape"]}
    if len(shapes) != 1:
        raise ValueError(f"latent rows have mixed shapes {sorted(shapes)}; one resolution per cache folder")
    shape = shapes.pop()
    flat = np.frombuffer(b"".join(frame["latent"]), dtype="<f2")
    return torch.from_numpy(flat.reshape(len(frame), *shape).copy())


def shard_number(path: Path) -> int:
    return int(path.stem.split("-")[1])


def write_shard(path: Path | str, rows: list[dict], row_group_bytes: int = ROW_GROUP_BYTES) -> None:
    """Write ``rows`` (SCHEMA dicts) atomically as one shard in the streaming layout (module docstring)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    row_bytes = max(1, max((len(r[LATENT]) for r in rows), default=1))
    others = [n for n in SCHEMA.names if n not in (LATENT, MASK)]
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=max(1, row_group_bytes // row_bytes),
            compression={n: ("none" if n == LATENT else "zstd") for n in SCHEMA.names},
            use_dictionary=others,
            write_statistics=others,  # min / max of 256 KiB blobs would only bloat the footer
        )


def needs_relayout(path: Path | str, row_group_bytes: int = ROW_GROUP_BYTES) -> bool:
    """True for a shard in an older layout (compressed latents or row groups well over ``row_group_bytes``)."""
    meta = pq.ParquetFile(path).metadata
    column = SCHEMA.names.index(LATENT)
    for g in range(meta.num_row_groups):
        chunk = meta.row_group(g).column(column)
        if chunk.compression != "UNCOMPRESSED" or (meta.row_group(g).num_rows > 1 and chunk.total_uncompressed_size > 2 * row_group_bytes):
            return True
    return False


class ShardWriter:
    """Buffers rows and writes a new shard whenever ``shard_bytes`` of latents have accumulated."""

    def __init__(self, root: Path | str, shard_bytes: int = 64 * 2**20, row_group_bytes: int = ROW_GROUP_BYTES):
        self.root = Path(root)
        self.shard_bytes = shard_bytes
        self.row_group_bytes = row_group_bytes
        self._rows: list[dict] = []
        self._bytes = 0
        self._next = max((shard_number(p) for p in self.root.glob(SHARD_GLOB)), default=-1) + 1
        self.written: list[Path] = []

    def reopen(self, shard: Path | str, rows: list[dict]) -> None:
        """Continue filling the newest, partly full ``shard``: its ``rows`` (kept ones, with any updated
        captions) are buffered and the next flush atomically replaces that shard with them plus new rows.
        Until then the old shard stays whole, so a kill loses nothing and a key never sits in two shards."""
        if self._rows:
            raise RuntimeError("reopen() must come before add()")
        number = shard_number(Path(shard))
        if number != self._next - 1:
            raise ValueError(f"{shard}: only the newest shard can be reopened")
        self._next = number
        self._rows = list(rows)
        self._bytes = sum(len(r["latent"]) for r in self._rows)

    def add(self, **row) -> None:
        self._rows.append(row)
        self._bytes += len(row["latent"])
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        path = self.root / f"shard-{self._next:05d}.parquet"
        write_shard(path, self._rows, self.row_group_bytes)
        self.written.append(path)
        self._next += 1
        self._rows, self._bytes = [], 0


def read_index(root: Path | str) -> pd.DataFrame:
    """Every row of every shard without the latent bytes, plus the shard it lives in."""
    frames = []
    for shard in sorted(Path(root).glob(SHARD_GLOB)):
        table = pq.read_table(shard, columns=INDEX_COLUMNS)
        frames.append(table.to_pandas().assign(shard=shard.name))
    if not frames:
        return pd.DataFrame(columns=INDEX_COLUMNS + ["shard"])
    return pd.concat(frames, ignore_index=True)


def read_latents(root: Path | str, domain: str | None = None) -> pd.DataFrame:
    """All rows (latent bytes included), optionally of one domain, in a stable order."""
    shards = sorted(Path(root).glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"no latent shards in {root}: run the cache stage first (`dvc repro cache`)")
    filters = [("domain", "==", domain)] if domain else None
    frame = pd.concat([pq.read_table(s, filters=filters).to_pandas() for s in shards], ignore_index=True)
    return frame.sort_values(["domain", "sha256", "flipped"], ignore_index=True)


class ShardReader:
    """Random access to the latent rows of a cache folder, without loading the cache.

    ``index`` holds every row's metadata (no latent bytes) with its ``shard_id`` and ``position`` in the
    shard. ``read`` fetches rows by (shard_id, position): each row group it needs is read with a plain
    positioned read of its latent column chunk (not a memory map: mapped pages of a 12 GiB cache would
    count in the process's resident memory), and the last ``cache_bytes`` of row groups read are kept,
    so a cache smaller than that is read from disk once. Safe to call from several threads.
    """

    def __init__(self, root: Path | str, cache_bytes: int = 256 << 20):
        self.root = Path(root)
        self.shards = sorted(self.root.glob(SHARD_GLOB))
        if not self.shards:
            raise FileNotFoundError(f"no latent shards in {root}: run the cache stage first (`dvc repro cache`)")
        self._meta, frames = [], []
        for shard_id, shard in enumerate(self.shards):  # one open per shard: its footer and its small columns
            with pq.ParquetFile(shard) as pf:
                self._meta.append(pf.metadata)
                frame = pf.read(columns=INDEX_COLUMNS).to_pandas()
            frames.append(frame.assign(shard_id=shard_id, position=np.arange(len(frame))))
        self._group_starts = [np.cumsum([0] + [m.row_group(g).num_rows for g in range(m.num_row_groups)]) for m in self._meta]
        self.index = pd.concat(frames, ignore_index=True)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def _group(self, shard_id: int, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, data bytes) of one row group's latent column."""
        key = (shard_id, group)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # A fresh handle per read (the footer is parsed once, above): ParquetFile is not thread-safe.
        with pq.ParquetFile(self.shards[shard_id], metadata=self._meta[shard_id]) as pf:
            column = pf.read_row_group(group, columns=[LATENT]).column(0)
        array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
        _, offsets, data = array.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int32)[array.offset : array.offset + len(array) + 1]
        entry = (offsets, np.frombuffer(data, dtype=np.uint8))
        size = entry[1].nbytes
        with self._lock:
            if size <= self.cache_bytes and key not in self._cache:
                self._cache[key] = entry
                self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes:
                    _, (_, old) = self._cache.popitem(last=False)
                    self._cached_bytes -= old.nbytes
        return entry

    def read(self, shard_ids: np.ndarray, positions: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Latent bytes of rows (shard_ids[i], positions[i]) into ``out[i]`` (uint8, (n, row_bytes)); each row
        group is read once per call."""
        groups = np.empty(len(positions), dtype=np.int64)
        for shard_id in np.unique(shard_ids):
            mine = shard_ids == shard_id
            groups[mine] = np.searchsorted(self._group_starts[shard_id], positions[mine], side="right") - 1
        for shard_id, group in sorted(set(zip(shard_ids.tolist(), groups.tolist()))):
            offsets, data = self._group(shard_id, group)
            start = self._group_starts[shard_id][group]
            for i in np.flatnonzero((shard_ids == shard_id) & (groups == group)):
                row = positions[i] - start
                value = data[offsets[row] : offsets[row + 1]]
                if value.nbytes != out.shape[1]:
                    raise ValueError(f"{self.shards[shard_id]}: row {positions[i]} holds {value.nbytes} latent bytes, expected {out.shape[1]}")
                out[i] = value
        return out
