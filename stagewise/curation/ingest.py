"""Ingest: domain folders -> manifest, one row per candidate file, each kept or rejected with a reason.

Incremental twice over: a file whose (path, size, mtime) matches the previous manifest is not even
re-hashed, and decode results are memoised by content hash, so a renamed or copied image is not
decoded again. Input folders are only ever read.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from pydantic import Field
from tqdm import tqdm

from stagewise.config import Section, fingerprint
from stagewise.faces.video import VIDEO_SUFFIXES, VideoError, probe_video
from stagewise.images import IMAGE_SUFFIXES, ImageError, probe, read_file, read_verified
from stagewise.store import ResultStore, memo_map

log = logging.getLogger(__name__)

DECODER_VERSION = 2  # 2: video files are probed (PyAV) instead of skipped. Bump when decode() changes what it accepts, to invalidate memoised probes

# Videos are listed (format "video/<codec>", the frame size as width x height); the align stage reads their frames.
CANDIDATE_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES
MANIFEST_COLUMNS = ["path", "domain", "sha256", "width", "height", "format", "mode", "size_bytes", "mtime_ns", "status", "reason"]


class IngestConfig(Section):
    min_side_px: int = Field(64, ge=1, description="shorter side below this is rejected as too small")
    # 8192 x 8192: larger photos are rare in face sets and decoding one costs ~200 MB of memory.
    max_pixels: int = Field(8192 * 8192, ge=1)
    max_file_mb: float = Field(256.0, gt=0, description="files above this are rejected without being read")
    workers: int = Field(4, ge=1, description="threads that hash and decode; PIL and hashlib release the GIL")


@dataclass(frozen=True)
class Candidate:
    domain: str
    path: str  # as found under the domain folder given on the command line


def scan(domains: dict[str, Path]) -> Iterator[Candidate]:
    """Every file with an image or video suffix under each domain folder, sorted, symlinked folders not followed."""
    for domain, root in domains.items():
        if not root.is_dir():
            raise FileNotFoundError(f"domain {domain!r}: folder {root} does not exist")
        found = []
        for folder, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
            dirnames.sort()
            found += [os.path.join(folder, name) for name in filenames if Path(name).suffix.lower() in CANDIDATE_SUFFIXES]
        for path in sorted(found):
            yield Candidate(domain, path)


def _examine(cand: Candidate, previous: dict[str, dict], cfg: IngestConfig) -> dict:
    """Stat and (when new or changed) read and hash one file: the manifest row so far, or with an error."""
    row = {"path": cand.path, "domain": cand.domain, "sha256": "", "size_bytes": -1, "mtime_ns": -1}
    try:
        cand.path.encode("utf-8")
    except UnicodeEncodeError:
        row["path"] = cand.path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return {**row, "error": "bad file name: not valid UTF-8, rename the file"}
    try:
        st = os.stat(cand.path)
    except OSError as exc:
        reason = "unreadable: symlink loop" if exc.errno == errno.ELOOP else f"unreadable: {exc.strerror}"
        return {**row, "error": reason}
    row.update(size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)
    if st.st_size > cfg.max_file_mb * 2**20:
        return {**row, "error": f"too large: {st.st_size / 2**20:.0f} MB file > max_file_mb {cfg.max_file_mb:g}"}
    old = previous.get(cand.path)
    if old is not None and old["size_bytes"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns and old["sha256"]:
        return {**row, "sha256": old["sha256"]}
    try:
        data = read_file(cand.path)
    except ImageError as exc:
        return {**row, "error": str(exc)}
    return {**row, "sha256": sha256(data).hexdigest()}


class Hashed(NamedTuple):
    path: str
    sha256: str


def _probe(row: Hashed, max_pixels: int) -> dict:
    """What decoding one new content gives: its size, format and mode, or why it does not decode (a
    property of the content, so memoised). A file that cannot be read (again) is unreadable instead."""
    data = read_verified(row.path, row.sha256)
    if Path(row.path).suffix.lower() in VIDEO_SUFFIXES:
        try:
            video = probe_video(data)
        except VideoError as exc:
            return {"error": str(exc), "width": -1, "height": -1, "format": "", "mode": ""}
        return {"error": None, "width": video.width, "height": video.height, "format": f"video/{video.codec}", "mode": "RGB"}
    try:
        info = probe(data, max_pixels)
    except ImageError as exc:
        return {"error": str(exc), "width": -1, "height": -1, "format": "", "mode": ""}
    return {"error": None, "width": info.width, "height": info.height, "format": info.format, "mode": info.mode}


def ingest(domains: dict[str, Path], cfg: IngestConfig, store_dir: Path, previous_manifest: Path | None = None) -> tuple[pd.DataFrame, int]:
    """Build the manifest. Returns it and the number of files that had to be decoded."""
    previous = {}
    if previous_manifest is not None and previous_manifest.exists():
        previous = {r["path"]: r for r in pd.read_parquet(previous_manifest).to_dict("records")}
    candidates = list(scan(domains))
    with ThreadPoolExecutor(cfg.workers) as pool:
        examined = pool.map(lambda cand: _examine(cand, previous, cfg), candidates)
        rows = list(tqdm(examined, total=len(candidates), desc="ingest", unit="img", mininterval=1.0))
    # Each new content hash is decoded once, even when several files hold it.
    hashed = [Hashed(row["path"], row["sha256"]) for row in rows if "error" not in row]
    store = ResultStore(store_dir, fingerprint("ingest", DECODER_VERSION, cfg.max_pixels))
    decoded = memo_map(hashed, store, functools.partial(_probe, max_pixels=cfg.max_pixels), workers=cfg.workers, desc="ingest decode")

    first_seen: dict[str, str] = {}
    out = []
    for row in rows:
        error = row.pop("error", None) or decoded.errors.get(row["sha256"])
        facts = decoded.values.get(row["sha256"], {}) if not error else {}
        error = error or facts.get("error")
        row.update({k: facts.get(k, d) for k, d in (("width", -1), ("height", -1), ("format", ""), ("mode", ""))})
        if error:
            status, reason = "rejected", error
        elif min(row["width"], row["height"]) < cfg.min_side_px:
            status, reason = "rejected", f"too small: {row['width']}x{row['height']} px < min_side_px {cfg.min_side_px}"
        elif row["sha256"] in first_seen:
            status, reason = "rejected", f"duplicate: same content as {first_seen[row['sha256']]}"
        else:
            first_seen[row["sha256"]] = row["path"]
            status, reason = "kept", ""
        out.append({**row, "status": status, "reason": reason})
    manifest = pd.DataFrame(out, columns=MANIFEST_COLUMNS)
    return manifest.astype({"width": "int64", "height": "int64", "size_bytes": "int64", "mtime_ns": "int64"}), decoded.computed


def summarize(manifest: pd.DataFrame) -> str:
    kept = int((manifest["status"] == "kept").sum())
    lines = [f"{kept} kept, {len(manifest) - kept} rejected of {len(manifest)} files"]
    for reason_kind, count in manifest.loc[manifest["status"] != "kept", "reason"].str.split(":").str[0].value_counts().items():
        lines.append(f"  {count:6d}  {reason_kind}")
    return "\n".join(lines)
