"""Atomic file writes and Parquet helpers.

Every output is written to a temporary name in the same folder, fsynced and renamed into place, so a
kill or a full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # what partial_write_pattern matches


def partial_write_pattern(names: str = "*") -> re.Pattern[str]:
    """The temp names ``atomic_path`` gives the files that ``names`` (a glob with ``*`` and ``?``) matches."""
    glob = re.escape(names).replace(r"\*", ".*").replace(r"\?", ".")
    return re.compile(rf"^\.{glob}\.tmp-\d+-[0-9a-f]{{8}}$")


def remove_partial_writes(folder: Path, names: str = "*") -> int:
    """Delete the temp files ``atomic_path`` left in ``folder`` for ``names`` (a glob) when a kill interrupted
    the write. Only for a folder with one writer at a time (DVC's lock): a live writer's temp file matches too."""
    pattern = partial_write_pattern(names)
    leftovers = [p for p in folder.glob(f".{names}.tmp-*") if pattern.match(p.name)] if folder.is_dir() else []
    for path in leftovers:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return len(leftovers)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path | str, table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_dir(root: Path | str, columns: list[str] | None = None) -> pd.DataFrame:
    """All ``*.parquet`` files under ``root`` as one frame (empty frame when there are none)."""
    files = sorted(Path(root).glob("*.parquet")) if Path(root).exists() else []
    if not files:
        return pd.DataFrame(columns=columns or [])
    return pd.concat([pq.read_table(f, columns=columns).to_pandas() for f in files], ignore_index=True)


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
