"""Watermark filter: rapidocr's bundled ONNX text detector measures how much of each image is text.

Detection only (no recognition, no direction classifier): we need *where* text is, not what it says.
Per image the detector's boxes are memoised by content hash + the fingerprint of the detector settings
(model file, input size, box threshold); the score and the keep/reject decision are recomputed from the
stored boxes every run, so changing ``threshold`` or ``min_line_aspect`` re-decides 100 000 images
without running the detector once.

Score = sum over text-line boxes of (box area / image area) x box confidence, capped at 1. A box counts
as a text line only when it is elongated (long side >= ``min_line_aspect`` x short side): the DB
detector also fires squat blobs on periodic texture (the stars of the flag behind Grace Hopper) and on
plain backgrounds, while lines of lettering are long and thin.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field
from tqdm import tqdm

from stagewise.config import Section, fingerprint
from stagewise.images import ImageError, decode, read_file
from stagewise.io import sha256_file
from stagewise.store import ResultStore

log = logging.getLogger(__name__)

# Bump when detect() changes what it stores (box format, pre-processing), to invalidate memoised boxes.
DETECTOR_VERSION = 1
DECIDED_BY_DETECTOR = "text detector"
DECIDED_BY_DECODE = "decode"
COLUMNS = ["path", "domain", "sha256", "status", "reason", "score", "text_area_frac", "max_confidence", "n_boxes", "n_ignored_boxes", "decided_by"]


class WatermarkConfig(Section):
    # Measured with these detector settings: the embedded sample's clean crops score 0.000 and its three
    # stamped copies 0.207-0.274 (10x margin); one line of the same stamp alone scores 0.047-0.099 (2x),
    # a small corner stamp 0.010-0.022 (caught at its larger size only). Readable real text goes too:
    # the dreambooth `can` labels score 0.011-0.029 (3 of 6 rejected), every other photo there <= 0.014.
    # Text in a training image is learnt like a watermark, so we err on rejecting. Raise to keep scene text.
    threshold: float = Field(0.02, ge=0, le=1, description="reject when the text score is above this")
    # Stamp lines measured 6.8-8.9 : 1 on the sample, the flag-star blobs that trip the detector on clean
    # crops at most 1.9 : 1 (about 2.5 : 1 on the dreambooth photos, scoring <= 0.015). Cost: boxes are padded, so a word
    # must have about five letters to count ("STOCK" 3.2 : 1; "SAM", "getty" 2.1 : 1 do not).
    min_line_aspect: float = Field(2.5, ge=1, description="a box counts as a text line when long side >= this x short side")
    # The longer side the detector sees. Watermarks are large; 512 px finds them at ~60 ms per image on
    # one CPU core, where full resolution would cost 10-50x more for no better decision.
    limit_side_len: int = Field(512, ge=32)
    box_thresh: float = Field(0.5, gt=0, lt=1, description="detector's minimum mean text probability inside a box (rapidocr default)")
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard; keep equal to ingest.max_pixels")
    workers: int = Field(2, ge=1, description="images decoded and detected at once; onnxruntime releases the GIL")
    # 0: share the machine's cores between workers (workers x threads = cores), so nothing oversubscribes.
    threads_per_worker: int = Field(0, ge=0)


# --------------------------------------------------------------------------------------------- detector


def bundled_model_path() -> Path:
    """The text-detection ONNX file that ships inside the rapidocr wheel (resolved as rapidocr does)."""
    from rapidocr.inference_engine.base import FileInfo, InferSession
    from rapidocr.main import DEFAULT_CFG_PATH, root_dir
    from rapidocr.utils.parse_parameters import ParseParams

    det = ParseParams.load(DEFAULT_CFG_PATH).Det
    info = InferSession.get_model_url(
        FileInfo(engine_type=det.engine_type, ocr_version=det.ocr_version, task_type=det.task_type, lang_type=det.lang_type, model_type=det.model_type)
    )
    return root_dir / "models" / Path(info["model_dir"]).name


def checked_model_path(model_path: Path | str | None) -> Path:
    path = Path(model_path) if model_path else bundled_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"text detector model not found: {path} (the bundled one ships inside the rapidocr wheel; reinstall rapidocr)")
    return path


def detector_fingerprint(cfg: WatermarkConfig, model_path: Path) -> str:
    """Everything that changes the stored boxes, and nothing that only changes the decision."""
    from importlib.metadata import version

    return fingerprint(
        "watermark-detector", DETECTOR_VERSION, version("rapidocr"), model_path.name, sha256_file(model_path),
        {"limit_side_len": cfg.limit_side_len, "resample": "bicubic", "box_thresh": cfg.box_thresh},
    )


def threads_for(cfg: WatermarkConfig) -> int:
    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.workers)


class TextDetector:
    """rapidocr's DB text detector through its own pipeline, with classification and recognition off."""

    def __init__(self, cfg: WatermarkConfig, model_path: Path | None = None, threads: int = 1):
        from rapidocr import RapidOCR

        self.model_path = checked_model_path(model_path)
        self.limit_side_len = cfg.limit_side_len
        self._engine = RapidOCR(params={
            "Global.use_det": True,
            "Global.use_cls": False,
            "Global.use_rec": False,
            "Global.log_level": "error",  # it warns once per image without text, which is most of them
            "Det.model_path": str(self.model_path),  # explicit: never fall back to a download
            "Det.limit_side_len": cfg.limit_side_len,
            "Det.limit_type": "max",  # only ever shrink (we already did); never upscale small images
            "Det.box_thresh": cfg.box_thresh,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })

    def prepare(self, img: Image.Image) -> Image.Image:
        """Shrink so the longer side is at most ``limit_side_len`` (part of the detector fingerprint)."""
        if max(img.size) <= self.limit_side_len:
            return img
        img = img.copy()
        img.thumbnail((self.limit_side_len, self.limit_side_len), Image.BICUBIC)
        return img

    def detect(self, img: Image.Image) -> list[list[float]]:
        """Text boxes in ``img``'s pixel coordinates: [x0, y0, x1, y1, x2, y2, x3, y3, confidence] each."""
        result = self._engine(img)  # RGB PIL image in; rapidocr converts to its BGR itself
        boxes, scores = getattr(result, "boxes", None), getattr(result, "scores", None)
        if boxes is None or scores is None or len(boxes) == 0:
            return []
        return [[round(float(v), 1) for v in np.asarray(box).reshape(-1)] + [round(float(s), 4)] for box, s in zip(boxes, scores)]


# ---------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class TextScore:
    score: float
    text_area_frac: float
    max_confidence: float
    n_boxes: int  # text-line boxes counted in the score
    n_ignored_boxes: int  # squat detections (texture, backgrounds) left out


def box_geometry(box: list[float]) -> tuple[float, float]:
    """(area in px^2, long side / short side) of a quadrilateral [x0, y0, ..., x3, y3]."""
    pts = np.asarray(box[:8], dtype=np.float64).reshape(4, 2)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))  # shoelace
    side = lambda a, b: float(np.hypot(*(pts[a] - pts[b])))  # noqa: E731
    width, height = (side(0, 1) + side(3, 2)) / 2, (side(1, 2) + side(0, 3)) / 2
    return area, max(width, height) / max(min(width, height), 1.0)


def score_boxes(boxes: list[list[float]], width_px: int, height_px: int, min_line_aspect: float) -> TextScore:
    area_px = max(width_px * height_px, 1)
    score = covered = max_conf = 0.0
    lines = ignored = 0
    for box in boxes:
        area, aspect = box_geometry(box)
        if aspect < min_line_aspect:
            ignored += 1
            continue
        confidence = box[8]
        lines += 1
        covered += area / area_px
        score += area / area_px * confidence
        max_conf = max(max_conf, confidence)
    # Overlapping boxes could sum past the whole image; the score is a fraction, so cap it.
    return TextScore(min(score, 1.0), min(covered, 1.0), max_conf, lines, ignored)


def decide(memo: dict, cfg: WatermarkConfig) -> dict:
    """Status, reason and score columns from memoised boxes (no detector involved)."""
    s = score_boxes(json.loads(memo["boxes"]), int(memo["input_width"]), int(memo["input_height"]), cfg.min_line_aspect)
    rejected = s.score > cfg.threshold
    reason = f"watermark: score {s.score:.3f} > threshold {cfg.threshold:g} ({DECIDED_BY_DETECTOR})" if rejected else ""
    return {
        "status": "rejected" if rejected else "kept", "reason": reason, "score": s.score, "text_area_frac": s.text_area_frac,
        "max_confidence": s.max_confidence, "n_boxes": s.n_boxes, "n_ignored_boxes": s.n_ignored_boxes, "decided_by": DECIDED_BY_DETECTOR,
    }


# ------------------------------------------------------------------------------------------------ stage


def score_images(manifest: pd.DataFrame, cfg: WatermarkConfig, store_dir: Path, model_path: Path | None = None) -> tuple[pd.DataFrame, int]:
    """One row per manifest-kept image, kept or rejected with a reason. Returns it and how many images
    went through the detector (the rest were memoised)."""
    kept = manifest[manifest["status"] == "kept"]
    model_path = checked_model_path(model_path)
    store = ResultStore(store_dir, detector_fingerprint(cfg, model_path))
    memo = store.lookup()
    todo = list(kept.loc[~kept["sha256"].isin(memo)].drop_duplicates("sha256").itertuples(index=False))
    errors: dict[str, str] = {}

    if todo:
        threads = threads_for(cfg)
        local = threading.local()  # one onnxruntime session per worker: each owns `threads` cores

        def work(row) -> tuple[str, dict | None, str | None]:
            try:
                data = read_file(row.path)
                if sha256(data).hexdigest() != row.sha256:
                    return row.sha256, None, "changed since ingest: content differs from the manifest's sha256 (rerun ingest)"
                img = decode(data, cfg.max_pixels)[0]
            except ImageError as exc:
                return row.sha256, None, str(exc)
            if not hasattr(local, "detector"):
                local.detector = TextDetector(cfg, model_path, threads)
            img = local.detector.prepare(img)
            boxes = local.detector.detect(img)
            return row.sha256, {"input_width": img.width, "input_height": img.height, "boxes": json.dumps(boxes)}, None

        log.info("text detector: %d new images, %d workers x %d onnxruntime threads", len(todo), cfg.workers, threads)
        with store, ThreadPoolExecutor(cfg.workers) as pool:
            for key, result, error in tqdm(pool.map(work, todo), total=len(todo), desc="watermark", unit="img", mininterval=1.0):
                if error is not None:
                    errors[key] = error  # not memoised: the file may be fixed without its hash changing
                    continue
                store.add(key, **result)
                memo[key] = result
    detected = len(todo) - len(errors)

    rows = []
    for row in kept.itertuples(index=False):
        base = {"path": row.path, "domain": row.domain, "sha256": row.sha256}
        if row.sha256 in errors:
            rows.append({**base, "status": "rejected", "reason": errors[row.sha256], "score": math.nan, "text_area_frac": math.nan,
                         "max_confidence": math.nan, "n_boxes": 0, "n_ignored_boxes": 0, "decided_by": DECIDED_BY_DECODE})
        else:
            rows.append({**base, **decide(memo[row.sha256], cfg)})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({"score": "float64", "text_area_frac": "float64", "max_confidence": "float64", "n_boxes": "int64", "n_ignored_boxes": "int64"}), detected


def summarize(frame: pd.DataFrame) -> str:
    rejected = frame[frame["status"] != "kept"]
    kept_scores = frame.loc[frame["status"] == "kept", "score"]
    lines = [f"{len(frame) - len(rejected)} kept, {len(rejected)} rejected of {len(frame)} images"]
    if len(kept_scores):
        lines.append(f"  highest kept score {kept_scores.max():.3f}")
    for row in rejected.head(20).itertuples(index=False):  # enough to see what kind; the Parquet has all
        lines.append(f"  {row.path}: {row.reason}")
    if len(rejected) > 20:
        lines.append(f"  ... and {len(rejected) - 20} more")
    return "\n".join(lines)
