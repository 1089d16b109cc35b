"""The latent cache on disk: Parquet shards of bounded size, one row per (image, flip) at one resolution.

Row: sha256, domain, resolution, codec_id, shape [C, H, W], latent (raw codec output as little-endian
float16 bytes, C order), flipped, caption, fingerprint (of the settings that produced the latent).
Shards are written to a temporary name and renamed into place, so a killed run leaves whole shards.

For flip augmentation use the ``flipped`` rows (cache.flip): mirroring a TAEF2 latent is NOT the latent
of the mirrored image (it decodes to 16-22 dB against the mirrored photo, vs 29-32 dB for a real encode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stagewise.io import write_parquet

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
    ]
)
SHARD_GLOB = "shard-*.parquet"


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


class ShardWriter:
    """Buffers rows and writes a new shard whenever ``shard_bytes`` of latents have accumulated."""

    def __init__(self, root: Path | str, shard_bytes: int = 64 * 2**20):
        self.root = Path(root)
        self.shard_bytes = shard_bytes
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
        write_parquet(path, pa.Table.from_pylist(self._rows, schema=SCHEMA))
        self.written.append(path)
        self._next += 1
        self._rows, self._bytes = [], 0


def read_index(root: Path | str) -> pd.DataFrame:
    """Every row of every shard without the latent bytes, plus the shard it lives in."""
    frames = []
    for shard in sorted(Path(root).glob(SHARD_GLOB)):
        table = pq.read_table(shard, columns=[n for n in SCHEMA.names if n != "latent"])
        frames.append(table.to_pandas().assign(shard=shard.name))
    if not frames:
        return pd.DataFrame(columns=[n for n in SCHEMA.names if n != "latent"] + ["shard"])
    return pd.concat(frames, ignore_index=True)


def read_latents(root: Path | str, domain: str | None = None) -> pd.DataFrame:
    """All rows (latent bytes included), optionally of one domain, in a stable order."""
    shards = sorted(Path(root).glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"no latent shards in {root}: run the cache stage first (`dvc repro cache`)")
    filters = [("domain", "==", domain)] if domain else None
    frame = pd.concat([pq.read_table(s, filters=filters).to_pandas() for s in shards], ignore_index=True)
    return frame.sort_values(["domain", "sha256", "flipped"], ignore_index=True)
