"""The swap stage: put the other domain's face on every face of a folder of photos or a video.

Per frame: detect and align (``extract.find_faces``, memoised per frame content and align settings), crop
each face at the model's resolution, encode with the codec, run the autoencoder with the other domain's
decoder (memoised per crop content, model weights and direction: one PNG per crop), decode, then blend (always recomputed,
cheap): colour transfer against the original face, the hull mask eroded and feathered, warped back with
the inverse transform. Changing only the blend params therefore runs neither the detector nor the model.

Frames with no usable face are written unchanged and counted; unreadable images and undecodable video
frames are counted and listed. A video input gives a video at the same frame rate with its audio copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from stagewise.codecs import Codec
from stagewise.config import Section, fingerprint
from stagewise.faces import align, masks
from stagewise.faces.blend import ColorTransfer, blend_mask, color_transfer, paste
from stagewise.faces.extract import AlignConfig, align_fingerprint, find_faces, png_bytes
from stagewise.faces.video import VIDEO_SUFFIXES, Frame, FrameError, probe_video, read_frames, write_video
from stagewise.images import IMAGE_SUFFIXES, ImageError, decode, read_file
from stagewise.io import write_bytes
from stagewise.models.autoencoder import Autoencoder
from stagewise.store import ResultStore, memo_map

log = logging.getLogger(__name__)

SWAP_VERSION = 1  # bump when the model path (crop -> swapped crop) changes
CHUNK_FRAMES = 32  # frames held at once: detection and the model run per chunk, memory stays flat
SHEET_CELL_PX = 256  # height of each before / after cell in sheet.png


class SwapConfig(Section):
    # A folder of photos (sorted by name) or one video file; outside the repository is fine (read only).
    input: str = "data/sample/a_unseen"
    stage: str = "gan"  # the training stage (runs/<stage>) whose model swaps
    direction: Literal["a_to_b", "b_to_a"] = "a_to_b"  # a_to_b: faces of domain A get B's face
    max_frames: int = Field(0, ge=0, description="first N images / frames only (0: all)")
    erode_px: int = Field(4, ge=0, description="mask erosion in crop pixels at the model resolution (DFL merger 'erode')")
    blur_px: int = Field(8, ge=0, description="mask feather in crop pixels at the model resolution (DFL merger 'blur')")
    color_transfer: ColorTransfer = "rct"  # DFL merger: none | rct (Reinhard, L*a*b*) | lct (linear, PCA)
    sheet_rows: int = Field(4, ge=1, le=16, description="before / after pairs in sheet.png")
    batch_size: int = Field(8, ge=1, description="faces per model forward pass")
    device: str = "auto"


class Ref(NamedTuple):  # a memo_map row: a frame held in memory, by content hash
    path: str
    sha256: str


@dataclass
class SwapResult:
    frames: int = 0
    swapped_frames: int = 0
    faces_swapped: int = 0
    unchanged_frames: int = 0  # no usable face: written as they were
    unreadable: int = 0
    detected_now: int = 0  # frames the detector ran on (the rest were memoised)
    model_now: int = 0  # faces the model ran on
    rows: list[dict[str, Any]] = field(default_factory=list)
    sheet: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def metrics(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("frames", "swapped_frames", "faces_swapped", "unchanged_frames", "unreadable", "detected_now", "model_now")}


def is_video_input(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def image_inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def frames_of(source: Path, max_frames: int) -> Iterator[tuple[str, Frame | FrameError]]:
    """(label, frame or error) for each image of a folder or each frame of a video."""
    count = 0
    if is_video_input(source):
        for item in read_frames(source):
            if max_frames and count >= max_frames:
                return
            count += 1
            yield f"{source.name}#{item.index}", item
        return
    for index, path in enumerate(image_inputs(source)):
        if max_frames and count >= max_frames:
            return
        count += 1
        try:
            img, _ = decode(read_file(path), 2**31)
        except ImageError as exc:
            yield path.relative_to(source).as_posix(), FrameError(index, 0.0, str(exc))
            continue
        yield path.relative_to(source).as_posix(), Frame(index, 0.0, np.asarray(img))


def frame_sha(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rgb.shape, np.int64).tobytes() + rgb.tobytes()).hexdigest()


class Swapper:
    def __init__(self, cfg: SwapConfig, align_cfg: AlignConfig, model: Autoencoder, model_sha: str, codec: Codec, store: Path, device: torch.device):
        self.cfg, self.align_cfg, self.model, self.codec, self.device = cfg, align_cfg, model.eval(), codec, device
        self.res = model.resolution_px
        self.source, self.target = ("a", "b") if cfg.direction == "a_to_b" else ("b", "a")
        self.detect_store = ResultStore(store / "detect", align_fingerprint(align_cfg, per_frame=True))
        # one PNG per swapped crop, in a folder per (model weights, codec, direction): a long video's faces
        # are looked up one file at a time instead of loading a Parquet memo of every crop for every chunk
        self.model_dir = store / "model" / fingerprint("swap", SWAP_VERSION, model_sha, codec.id, cfg.direction, self.res)

    def _detect(self, chunk: dict[str, np.ndarray]) -> tuple[dict[str, list[dict]], int]:
        refs = [Ref(sha, sha) for sha in chunk]
        result = memo_map(refs, self.detect_store, lambda r: {"faces": json.dumps(find_faces(chunk[r.sha256], self.align_cfg))}, workers=1, desc="swap detect")
        return {sha: json.loads(v["faces"]) for sha, v in result.values.items()}, result.computed

    @torch.no_grad()
    def _run_model(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        rgb = torch.from_numpy(np.stack(crops)).to(self.device).permute(0, 3, 1, 2).float().div(255)
        latent = self.codec.normalize(self.codec.encode(rgb))
        out = self.model.decode(self.model.encode(latent), self.target)
        pixels = self.codec.decode(self.codec.denormalize(out.float())).clamp(0, 1)
        return list((pixels.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))

    def _swap_faces(self, crops: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """The swapped crop of every crop (by content hash): memoised PNGs, the rest through the model in batches."""
        out, todo = {}, []
        for sha in crops:
            path = self.model_dir / f"{sha}.png"
            if path.exists():
                with Image.open(path) as img:
                    out[sha] = np.asarray(img.convert("RGB"))
            else:
                todo.append(sha)
        for start in range(0, len(todo), self.cfg.batch_size):
            batch = todo[start : start + self.cfg.batch_size]
            for sha, img in zip(batch, self._run_model([crops[sha] for sha in batch])):
                write_bytes(self.model_dir / f"{sha}.png", png_bytes(img))
                out[sha] = img
        return out, len(todo)

    def blend(self, frame: np.ndarray, faces: list[dict], crops: list[tuple[str, np.ndarray, np.ndarray]], swapped: dict[str, np.ndarray]) -> np.ndarray:
        out = frame
        for (sha, crop, mat), face in zip(crops, faces):
            landmarks = np.array(face["landmarks"]).reshape(-1, 2)
            hull = masks.face_mask(align.apply(mat, landmarks), self.res)
            new = color_transfer(self.cfg.color_transfer, swapped[sha], crop, hull / 255.0)
            out = paste(out, new, blend_mask(hull, self.cfg.erode_px, self.cfg.blur_px), mat)
        return out

    def run(self, items: Iterator[tuple[str, Frame | FrameError]], result: SwapResult) -> Iterator[tuple[str, np.ndarray]]:
        """(label, output frame) for every readable input frame, in order."""
        pending: list[tuple[str, Frame | FrameError]] = []
        for item in items:
            pending.append(item)
            if len(pending) >= CHUNK_FRAMES:
                yield from self._chunk(pending, result)
                pending = []
        if pending:
            yield from self._chunk(pending, result)

    def _chunk(self, pending: list[tuple[str, Frame | FrameError]], result: SwapResult) -> Iterator[tuple[str, np.ndarray]]:
        frames = {frame_sha(f.rgb): f.rgb for _, f in pending if isinstance(f, Frame)}
        found, now = self._detect(frames)
        result.detected_now += now
        scale = self.res / self.align_cfg.crop_px
        plans, crops = [], {}
        for label, item in pending:
            if isinstance(item, FrameError):
                plans.append((label, item, None, [], []))
                continue
            sha = frame_sha(item.rgb)
            kept = [f for f in found[sha] if f["status"] == "kept"]
            face_crops = []
            for face in kept:
                mat = np.array(face["transform"]).reshape(2, 3) * scale
                crop = align.warp(item.rgb, mat, self.res)
                crop_sha = frame_sha(crop)
                crops[crop_sha] = crop
                face_crops.append((crop_sha, crop, mat))
            plans.append((label, item, found[sha], kept, face_crops))
        swapped, now = self._swap_faces(crops) if crops else ({}, 0)
        result.model_now += now
        for label, item, faces, kept, face_crops in plans:
            row = {"input": label, "frame_index": item.index, "time_s": item.time_s}
            result.frames += 1
            if isinstance(item, FrameError):
                result.unreadable += 1
                result.rows.append({**row, "status": "unreadable", "reason": item.reason, "faces": 0})
                continue
            if not kept:
                result.unchanged_frames += 1
                why = "; ".join(sorted({f["reason"] for f in faces})) or "no face"
                result.rows.append({**row, "status": "unchanged", "reason": why, "faces": 0})
                yield label, item.rgb
                continue
            out = self.blend(item.rgb, kept, face_crops, swapped)
            result.swapped_frames += 1
            result.faces_swapped += len(kept)
            result.rows.append({**row, "status": "swapped", "reason": "", "faces": len(kept)})
            if len(result.sheet) < self.cfg.sheet_rows:
                result.sheet.append((_thumb(item.rgb), _thumb(out)))
            yield label, out


def _thumb(rgb: np.ndarray) -> np.ndarray:
    img = Image.fromarray(rgb)
    return np.asarray(img.resize((max(1, round(img.width * SHEET_CELL_PX / img.height)), SHEET_CELL_PX), Image.LANCZOS))


def sheet_image(pairs: list[tuple[np.ndarray, np.ndarray]], title: str) -> Image.Image:
    """Rows of before | after."""
    from PIL import ImageDraw, ImageFont

    header = 28
    if not pairs:
        canvas = Image.new("RGB", (2 * SHEET_CELL_PX, header + SHEET_CELL_PX), "white")
        ImageDraw.Draw(canvas).text((8, header + 8), "no face was swapped", fill="black", font=ImageFont.load_default(size=18))
        return canvas
    width = max(b.shape[1] + a.shape[1] for b, a in pairs)
    canvas = Image.new("RGB", (width, header + SHEET_CELL_PX * len(pairs)), "white")
    for row, (before, after) in enumerate(pairs):
        canvas.paste(Image.fromarray(before), (0, header + row * SHEET_CELL_PX))
        canvas.paste(Image.fromarray(after), (before.shape[1], header + row * SHEET_CELL_PX))
    ImageDraw.Draw(canvas).text((8, header // 2), f"before | after  ({title})", fill="black", font=ImageFont.load_default(size=18), anchor="lm")
    return canvas


def swap(source: Path, out_dir: Path, swapper: Swapper) -> SwapResult:
    """Swap every frame of ``source`` into ``out_dir/frames`` (images, or one video); returns the counts."""
    cfg = swapper.cfg
    frames_dir = out_dir / "frames"
    result = SwapResult()
    items = frames_of(source, cfg.max_frames)
    outputs = swapper.run(items, result)
    if is_video_input(source):
        info = probe_video(source)
        written = write_video(frames_dir / f"{source.stem}.mp4", (rgb for _, rgb in outputs), info.fps, audio_from=source if info.has_audio else None)
        log.info("%s: %d frames written at %.3f fps", source, written, info.fps)
    else:
        for label, rgb in outputs:
            write_bytes(frames_dir / Path(label).with_suffix(".png"), png_bytes(rgb))
    return result
