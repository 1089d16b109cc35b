"""The per-image result store that makes curation incremental.

Each stage keeps one store folder of Parquet parts. A row is keyed by the image's ``sha256`` and the
``fingerprint`` of the settings that produced it, so adding 100 images to 100 000 computes 100 rows, and
switching a setting back and forth reuses what was computed before. Parts are flushed every
``flush_every`` rows (atomically), so a killed run keeps what it finished. The store is a memo, never
a source of truth: deleting the folder only costs recomputation.
"""

from __future__ import annotations

import time
import os
from pathlib import Path
from typing import Any

import pandas as pd

from stagewise.io import read_parquet_dir, write_parquet

KEY = ["sha256", "fingerprint"]
MAX_PARTS = 32  # beyond this many parts, merge them: many small files make every lookup slower


class ResultStore:
    def __init__(self, root: Path | str, fingerprint: str, flush_every: int = 256):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.flush_every = flush_every
        self._pending: list[dict[str, Any]] = []

    def lookup(self) -> dict[str, dict[str, Any]]:
        """Rows computed earlier with this fingerprint, by sha256."""
        frame = read_parquet_dir(self.root)
        if frame.empty:
            return {}
        frame = frame[frame["fingerprint"] == self.fingerprint].drop_duplicates("sha256", keep="last")
        frame = frame.astype(object).where(frame.notna(), None)  # Parquet nulls come back as NaN
        return {row["sha256"]: row for row in frame.to_dict("records")}

    def add(self, sha256: str, **values: Any) -> None:
        self._pending.append({"sha256": sha256, "fingerprint": self.fingerprint, **values})
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
        write_parquet(self.root / name, pd.DataFrame(self._pending))
        self._pending = []

    def close(self) -> None:
        self.flush()
        parts = sorted(self.root.glob("part-*.parquet"))
        if len(parts) > MAX_PARTS:
            self._compact(parts)

    def _compact(self, parts: list[Path]) -> None:
        merged = read_parquet_dir(self.root).drop_duplicates(KEY, keep="last")
        write_parquet(self.root / f"part-{time.time_ns()}-{os.getpid()}.parquet", merged)
        for part in parts:  # only after the merged part is safely in place
            part.unlink()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
