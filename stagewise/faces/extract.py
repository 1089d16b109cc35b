"""The align stage: every face of every kept image and video frame, aligned, cropped and masked.

Input is ingest's manifest; output is the manifest the filters and the cache read (``faces.parquet``):
one ``kept`` row per aligned face crop (``path`` = the crop PNG, ``sha256`` = its content hash, plus the
source file, frame index and time stamp, detector score, face size, the 478 landmarks in source pixels
and the 2x3 source -> crop transform), and one ``rejected`` row with a reason per image or frame that
gave no usable face (no face, too many faces, low confidence, face too small, face cut off by the
frame, profile, landmarks failed) and per video or frame that could not be decoded.

The crops (``<faces>/crops/<sha>.png``) and their masks (``<faces>/masks/<sha>.png``: red = face hull,
green = eyes and mouth) live in a folder the stage owns (a DVC ``persist`` output): files no longer listed
are removed at the end of a run. Detection results are memoised per source content hash and settings
(``memo_map``); a memoised source whose crops went missing is processed again.

With ``enabled: false`` the output is ingest's kept images unchanged, and video files are rejected
with a reason (their frames are read only when faces are extracted).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field

from stagewise.config import Section, fingerprint
from stagewise.faces import align, masks
from stagewise.faces.align import FaceType
from stagewise.faces.detect import DETECTOR_VERSION, finder
from stagewise.faces.video import FrameError, VideoError, read_frames
from stagewise.images import ImageError, decode, read_verified
from stagewise.io import write_bytes
from stagewise.store import ResultStore, memo_map

log = logging.getLogger(__name__)

ALIGN_VERSION = 1  # bump when a crop or a reason changes for the same settings: every source is redone
MAX_PIXELS = 2**31  # ingest applied the user's max_pixels; the sha256 is checked before decoding
PNG_LEVEL = 1  # fixed, so the same crop always has the same bytes (content hash); zlib 1: 4x faster than 6 for 10 % more bytes
FACE_COLUMNS = ["source_path", "source_sha256", "frame_index", "time_s", "face_index", "score", "face_px", "landmarks", "transform"]


class AlignConfig(Section):
    enabled: bool = False  # false: the dataset is the whole images (no face crops); params.yaml turns it on for the demo
    face_type: FaceType = "whole_face"  # DFL face types: whole_face (forehead included) or head (hair and chin too)
    crop_px: int = Field(512, ge=16, description="side of the aligned crop; the largest cache resolution, so no stage upsamples")
    min_face_px: float = Field(64, ge=1, description="faces smaller than this in the source (DFL's unit face square) are rejected")
    max_faces: int = Field(4, ge=1, description="an image or frame with more faces is a crowd: rejected, its faces are not the subject")
    min_confidence: float = Field(0.6, ge=0, le=1, description="detector score below this is rejected (the detector itself keeps >= 0.3)")
    max_yaw: float = Field(0.5, gt=0, description="nose offset from the eyes' midline, in eye distances; beyond it a face is a profile the mesh places badly")
    max_outside: float = Field(0.4, ge=0, le=1, description="share of the crop outside the source (a face cut off by the frame, or a huge one) above which it is rejected")
    every_nth_frame: int = Field(5, ge=1, description="video: every n-th frame (neighbouring frames are near duplicates)")
    workers: int = Field(2, ge=1, description="threads, each with its own detector and mesh graph")


def align_fingerprint(cfg: AlignConfig, per_frame: bool = False) -> str:
    """The memo key of a source's faces; ``per_frame`` (the swap stage's key): without the video sampling."""
    settings = cfg.model_dump(exclude={"enabled", "workers", *(["every_nth_frame"] if per_frame else [])})
    return fingerprint("align", ALIGN_VERSION, masks.MASK_VERSION, DETECTOR_VERSION, settings)


def is_video(row: Any) -> bool:
    return str(getattr(row, "format", "")).startswith("video")


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def outside_share(mat: np.ndarray, width: int, height: int, size_px: int) -> float:
    """The share of the crop square whose source pixel lies outside the photo (sampled on a 32 x 32 grid)."""
    grid = (np.stack(np.meshgrid(np.arange(32), np.arange(32)), -1).reshape(-1, 2) + 0.5) * (size_px / 32)
    src = align.apply(align.invert(mat), grid)
    inside = (src[:, 0] >= 0) & (src[:, 0] < width) & (src[:, 1] >= 0) & (src[:, 1] < height)
    return float(1.0 - inside.mean())


def find_faces(rgb: np.ndarray, cfg: AlignConfig) -> list[dict[str, Any]]:
    """One dict per face found (kept ones with landmarks and the ``crop_px`` transform), or one for the frame
    when there is none or too many; nothing is written. The swap stage memoises exactly this per frame."""
    found = finder()
    dets = found.detect(rgb)
    if not dets:
        return [{"status": "rejected", "reason": "no face: the detector found none"}]
    if len(dets) > cfg.max_faces:
        return [{"status": "rejected", "reason": f"too many faces: {len(dets)} > max_faces {cfg.max_faces}"}]
    h, w = rgb.shape[:2]
    out = []
    for index, det in enumerate(dets):
        row: dict[str, Any] = {"face_index": index, "score": det.score, "face_px": det.size_px, "status": "rejected"}
        if det.score < cfg.min_confidence:
            out.append({**row, "reason": f"low confidence: detector score {det.score:.2f} < min_confidence {cfg.min_confidence:g}"})
            continue
        if det.size_px < cfg.min_face_px:
            out.append({**row, "reason": f"face too small: {det.size_px:.0f} px < min_face_px {cfg.min_face_px:g}"})
            continue
        landmarks = found.landmarks(rgb, det)
        if landmarks is None:
            out.append({**row, "reason": "landmarks failed: the face mesh found no face in the detection"})
            continue
        size = align.face_size_px(landmarks)
        row.update(face_px=size, landmarks=landmarks.ravel().round(2).tolist())
        yaw = align.yaw_ratio(landmarks)
        mat = align.transform(landmarks, cfg.crop_px, cfg.face_type)
        cut = outside_share(mat, w, h, cfg.crop_px)
        if size < cfg.min_face_px:
            out.append({**row, "reason": f"face too small: {size:.0f} px < min_face_px {cfg.min_face_px:g}"})
        elif yaw > cfg.max_yaw:
            out.append({**row, "reason": f"profile: yaw {yaw:.2f} > max_yaw {cfg.max_yaw:g} (the mesh places a turned face badly)"})
        elif cut > cfg.max_outside:
            out.append({**row, "reason": f"face cut off: {cut:.0%} of the {cfg.face_type} crop outside the image > max_outside {cfg.max_outside:g}"})
        else:
            out.append({**row, "transform": mat.ravel().tolist(), "status": "kept", "reason": ""})
    return out


def faces_in_frame(rgb: np.ndarray, cfg: AlignConfig, faces_dir: Path) -> list[dict[str, Any]]:
    """``find_faces``, with each kept face's crop and mask written to ``faces_dir`` (named by the crop's sha256)."""
    out = find_faces(rgb, cfg)
    for face in out:
        if face["status"] != "kept":
            continue
        mat = np.array(face["transform"]).reshape(2, 3)
        landmarks = np.array(face["landmarks"]).reshape(-1, 2)
        crop = png_bytes(align.warp(rgb, mat, cfg.crop_px))
        sha = face["crop_sha256"] = hashlib.sha256(crop).hexdigest()
        mask = png_bytes(masks.mask_image(align.apply(mat, landmarks), cfg.crop_px))
        if not crop_path(faces_dir, sha).exists():  # named by its content: present means identical
            write_bytes(crop_path(faces_dir, sha), crop)
        write_bytes(mask_path(faces_dir, sha), mask)  # a changed mask code (MASK_VERSION) rewrites it
    return out


def crop_path(faces_dir: Path, sha: str) -> Path:
    return faces_dir / "crops" / f"{sha}.png"


def mask_path(faces_dir: Path, sha: str) -> Path:
    return faces_dir / "masks" / f"{sha}.png"


def process_source(row: Any, cfg: AlignConfig, faces_dir: Path) -> dict[str, Any]:
    """The memoised value of one manifest row: its faces as JSON rows (with frame index and time for video)."""
    data = read_verified(row.path, row.sha256)  # ImageError (vanished, changed): Unreadable, not memoised
    rows: list[dict[str, Any]] = []
    if is_video(row):
        frames = 0
        try:
            for frame in read_frames(data, cfg.every_nth_frame):
                where = {"frame_index": frame.index, "time_s": round(frame.time_s, 4)}
                if isinstance(frame, FrameError):
                    rows.append({**where, "status": "rejected", "reason": frame.reason})
                    continue
                frames += 1
                rows += [{**where, **face} for face in faces_in_frame(frame.rgb, cfg, faces_dir)]
        except VideoError as exc:
            rows.append({"status": "rejected", "reason": str(exc)})
        if not frames and not any(r.get("reason", "").startswith(("corrupt", "not a video", "empty")) for r in rows):
            rows.append({"status": "rejected", "reason": "empty video: no frame could be decoded"})
    else:
        try:
            img, _ = decode(data, MAX_PIXELS)
        except ImageError as exc:
            return {"faces": json.dumps([{"status": "rejected", "reason": str(exc)}])}
        rows = faces_in_frame(np.asarray(img), cfg, faces_dir)
    return {"faces": json.dumps(rows)}


def _crops_present(faces_dir: Path, stored: dict[str, Any]) -> bool:
    return all(crop_path(faces_dir, r["crop_sha256"]).exists() and mask_path(faces_dir, r["crop_sha256"]).exists()
               for r in json.loads(stored["faces"]) if r.get("status") == "kept")


def extract(manifest: pd.DataFrame, cfg: AlignConfig, faces_dir: Path, store_dir: Path) -> tuple[pd.DataFrame, int]:
    """The faces manifest (module docstring) and how many sources were processed now (not memoised)."""
    kept = manifest[manifest["status"] == "kept"]
    for sub in ("crops", "masks"):  # a DVC output: present even when empty
        (faces_dir / sub).mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        videos = kept.apply(is_video, axis=1) if len(kept) else pd.Series([], dtype=bool)
        out = kept.copy()
        out.loc[videos, ["status", "reason"]] = ["rejected", "video: frames are extracted only with params.yaml align.enabled: true"]
        prune(faces_dir, set())
        return out.reset_index(drop=True), 0
    store = ResultStore(store_dir, align_fingerprint(cfg))
    result = memo_map(
        kept, store, lambda row: process_source(row, cfg, faces_dir), workers=cfg.workers, desc="align",
        reuse=lambda row, stored: _crops_present(faces_dir, stored),
    )  # fmt: skip
    rows, first_of = [], {}
    for src in kept.itertuples(index=False):
        base = {"domain": src.domain, "source_path": src.path, "source_sha256": src.sha256, "frame_index": -1, "time_s": float("nan"), "face_index": -1}
        if src.sha256 in result.errors:
            rows.append({**base, "path": src.path, "sha256": src.sha256, "status": "rejected", "reason": result.errors[src.sha256]})
            continue
        for face in json.loads(result.values[src.sha256]["faces"]):
            row = {**base, **{k: v for k, v in face.items() if k != "crop_sha256"}}
            where = f"frame {face['frame_index']} ({face['time_s']:.2f} s): " if face.get("frame_index", -1) >= 0 else ""
            if face["status"] != "kept":
                rows.append({**row, "path": src.path, "sha256": src.sha256, "reason": where + face["reason"]})
                continue
            sha = face["crop_sha256"]
            path = crop_path(faces_dir, sha).as_posix()
            if sha in first_of:
                rows.append({**row, "path": src.path, "sha256": src.sha256, "status": "rejected", "reason": f"{where}duplicate: same aligned crop as {first_of[sha]}"})
                continue
            first_of[sha] = src.path + (f" frame {face['frame_index']}" if where else "")
            rows.append({**row, "path": path, "sha256": sha, "width": cfg.crop_px, "height": cfg.crop_px, "format": "PNG", "mode": "RGB"})
    columns = ["path", "domain", "sha256", "width", "height", "format", "mode", "status", "reason", *FACE_COLUMNS]
    out = pd.DataFrame(rows).reindex(columns=columns)
    out["frame_index"] = out["frame_index"].fillna(-1).astype("int64")
    out["face_index"] = out["face_index"].fillna(-1).astype("int64")
    prune(faces_dir, set(first_of))
    return out, result.computed


def prune(faces_dir: Path, keep: set[str]) -> int:
    """Remove crops and masks that no row lists (the folder is this stage's output, rewritten by every run)."""
    removed = 0
    for sub in ("crops", "masks"):
        for path in (faces_dir / sub).glob("*.png") if (faces_dir / sub).is_dir() else []:
            if path.stem not in keep:
                path.unlink()
                removed += 1
    return removed


def summarize(faces: pd.DataFrame) -> str:
    kept = faces[faces["status"] == "kept"]
    lines = [f"{len(kept)} face crops from {kept['source_sha256'].nunique() if 'source_sha256' in kept else len(kept)} sources; {int((faces['status'] != 'kept').sum())} rejected rows"]
    for kind, count in faces.loc[faces["status"] != "kept", "reason"].str.replace(r"^frame \d+ \([^)]*\): ", "", regex=True).str.split(":").str[0].value_counts().items():
        lines.append(f"  {count:6d}  {kind}")
    return "\n".join(lines)
