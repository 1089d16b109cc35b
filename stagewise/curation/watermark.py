"""Watermark filter: rapidocr's bundled ONNX text detector measures how much of each image is text.

Detection only (no recognition, no direction classifier): we need *where* text is, not what it says.
By default the bundled model runs quantized to int8 (``detector_int8``; ``stagewise.curation.int8``).
Per image the detector's boxes are memoised by content hash + the fingerprint of the detector settings
(model file, input size, box threshold); the score and the keep/reject decision are recomputed from the
stored boxes every run, so changing ``threshold`` or ``min_line_aspect`` re-decides 100 000 images
without running the detector once.

Score = sum over text-line boxes of (box area / image area) x box confidence, capped at 1. A box counts
as a text line only when it is elongated (long side >= ``min_line_aspect`` x short side): the DB
detector also fires squat blobs on periodic texture (the stars of the flag behind Grace Hopper) and on
plain backgrounds, while lines of lettering are long and thin.

Small credits along the top or bottom edge (a URL, a (c) line: the commonest stock mark) cover too little
of the image for that score, and at 512 px they are a few pixels tall. So the detector also sees the
image's top and bottom strips (``edge_strip_frac`` of the height) at up to ``edge_side_px``, stacked
into one input: ``edge_score`` is the same area-times-confidence sum over the text lines of credit size
(at most ``edge_max_box_frac`` of a strip; the detector boxes a whole strip of blur or texture as one
"line") over a strip's area, and an image is rejected when either score is above its threshold.

The cascade (off by default: no CLIP or VLM weights can be downloaded here). The text detector is cheap
and decides every image whose score is outside the uncertain band ``[band_low, band_high)``, by
``threshold`` as without the cascade. Only band images go on: to CLIP zero-shot (``clip``: P(watermark)
from prompt pairs, reject above ``clip.threshold``), then, when CLIP is not sure or not configured, to
a vision-language model (``vlm``: yes/no questions, see ``stagewise.curation.vlm``). Each step is
optional and memoised on its own (detector boxes, CLIP embeddings, VLM answers), so a rerun computes
only what is new, and a changed threshold or band re-decides without running any model. ``decided_by``
and the reason name the step that decided.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from pydantic import Field, model_validator

from stagewise.config import Section, fingerprint
from stagewise.curation.clip import ClipConfig, Embedder, zero_shot
from stagewise.curation.vlm import Question, VlmConfig, answers_for, matching
from stagewise.curation.vlm import locate as locate_vlm
from stagewise.images import load_verified
from stagewise.io import sha256_file
from stagewise.store import ResultStore, ThreadLocal, memo_map

log = logging.getLogger(__name__)

# Bump when detect() changes what it stores (box format, pre-processing), to invalidate memoised boxes.
DETECTOR_VERSION = 2  # 2: the edge strips' boxes
DECIDED_BY_DETECTOR = "text detector"
DECIDED_BY_EDGE = "edge text"  # the text detector on the edge strips
DECIDED_BY_CLIP = "clip"
DECIDED_BY_VLM = "vlm"
DECIDED_BY_DECODE = "decode"
DECIDED_BY_HEAD = "watermark head"
COLUMNS = [
    "path", "domain", "sha256", "status", "reason", "score", "edge_score", "text_area_frac", "max_confidence", "n_boxes", "n_ignored_boxes",
    "head_score", "head_edge_score", "head_lit_frac", "head_p", "clip_p", "vlm_answers", "decided_by",
]
WATERMARK_QUESTION = "Is there a watermark, logo or text overlay?"


class ClipStep(ClipConfig):
    """CLIP zero-shot in the cascade: the model (see ClipConfig) plus how its answer decides."""

    # Several phrasings, averaged: one prompt pair is brittle in zero-shot CLIP.
    prompts: list[tuple[str, str]] = Field(
        default_factory=lambda: [
            ("a photo with a watermark", "a clean photo"),
            ("a stock photo with a semi-transparent text or logo overlay", "a photo without any overlay"),
        ],
        min_length=1,
        description="(watermarked, clean) prompt pairs; P(watermark) is the softmax of the first, averaged over pairs",
    )
    threshold: float = Field(0.8, gt=0, lt=1, description="reject when P(watermark) is above this")
    # Only with a VLM configured: band images with keep_below <= P <= threshold go to the VLM; below
    # it CLIP keeps them. 0.3: CLIP's own two-way softmax rarely goes below 0.3 on real overlays.
    keep_below: float = Field(0.3, ge=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ClipStep":
        if self.keep_below > self.threshold:
            raise ValueError(f"keep_below ({self.keep_below}) must not exceed threshold ({self.threshold})")
        return self


class VlmStep(VlmConfig):
    """The VLM in the cascade: VlmConfig (model, prompt, batching) asking only about watermarks by default."""

    questions: list[Question] = Field(default_factory=lambda: [Question(text=WATERMARK_QUESTION)], min_length=1)


class WatermarkConfig(Section):
    # Chosen on benchmarks/watermark_eval.py (133 clean photos, 797 stamped copies, two stamp seeds), with
    # the detail layer below: the lowest threshold that keeps >= 95 % of the clean photos with two photos to
    # spare on both seeds (129 of 133 kept; the four rejected carry real text: three beer-can labels and the
    # lettering on scikit-image's coins). It rejects 80 % / 73 % (seed 0 / 1) of text stamps at >= 20 % opacity, against 74 % / 66 %
    # on the plain image (threshold 0.012). Most misses are marks the detector does not see at all (low
    # contrast, thin serif, or over the photo's main subject, where its map becomes one subject-sized
    # blob); no threshold recovers them: that is the cascade's job. Text in a training image is learnt
    # like a watermark, so we err on rejecting; raise the threshold to keep scene text. The sample keeps its
    # margin: clean crops 0.000, its three stamped copies >= 0.205.
    threshold: float = Field(0.009, ge=0, le=1, description="reject when the text score is above this")
    # Stamp lines measured 6.8-8.9 : 1 on the sample; the flag-star blobs that trip the detector on its
    # clean crops at most 1.9 : 1. 2.2 rather than 2.5 counts short padded words ("getty", "123RF",
    # "iStock" measure 2.1-2.4 : 1): +3 points of recall on the evaluation at the same clean keep rate.
    min_line_aspect: float = Field(2.2, ge=1, description="a box counts as a text line when long side >= this x short side")
    # The longer side the detector sees. Watermarks are large; 512 px finds them at ~60 ms per image on
    # one CPU core, where full resolution would cost 10-50x more for no better decision.
    limit_side_len: int = Field(512, ge=32)
    # The detector sees the image's detail layer, (image - blur) x gain + grey, not the photo: a
    # semi-transparent mark is a small, sharp change in brightness, which the photo's own contrast (a
    # mark over a bright sky or a face) hides from a detector trained on dark-on-light text. Measured on
    # benchmarks/watermark_eval.py at the same clean keep rate (0.970): text >= 20 % opacity recall
    # 0.749 -> 0.80 (seed 0) and 0.663 -> 0.73 (seed 1), same cost (one detector pass). Gain 4-5 gained
    # one more point but turned a column of flag stars in a clean sample crop into a "text line"; sigma 4
    # or 16 did worse. 0 turns it off.
    highpass_sigma_px: float = Field(8.0, ge=0, description="blur radius of the detail layer the detector sees; 0: the plain image")
    highpass_gain: float = Field(3.0, gt=0, description="contrast gain of the detail layer")
    box_thresh: float = Field(0.5, gt=0, lt=1, description="detector's minimum mean text probability inside a box (rapidocr default)")
    # The bundled detector quantized to int8 here (stagewise.curation.int8): 147 -> 35 ms per 512 x 320 input on
    # one core, 5.0 -> 13.2 images/s for the detector with its edge strips on two; on benchmarks/watermark_eval.py
    # text 0.807 -> 0.807, edge text 0.539 -> 0.565, clean keep 0.965 -> 0.969. Ignored when the stage is
    # given its own model file.
    detector_int8: bool = Field(True, description="run the bundled text detector quantized to int8 (4x faster); false: float32")
    # The edge strips (see the module docstring). Measured on benchmarks/watermark_eval.py (232 held-out
    # photos, 1611 stamped copies): small edge text at >= 20 % opacity caught 0.043 -> 0.539, all text
    # 0.779 -> 0.807, clean keep 0.974 -> 0.965, at 5.0 images/s instead of 8.1 on two cores in float32 (the
    # strips are a second detector pass of about the whole image's cost; int8: 13.2). 0.12 holds a credit 3 %
    # of the shorter side from the edge; 0.10 caught fewer, 0.15 kept fewer clean photos. Strips are only ever shrunk to
    # edge_side_px: enlarging 640 px photos to 1024 caught 6 points more edge text and kept 1.3 points fewer
    # clean photos at twice the cost. 0 turns the strips off.
    edge_strip_frac: float = Field(0.12, ge=0, le=0.5, description="height share of the top and bottom strips the detector also sees; 0: none")
    edge_side_px: int = Field(1024, ge=32, description="the strips' longer side (only ever shrunk to it)")
    # A credit is a short line; the detector's boxes over a whole strip of bokeh, sand or wood grain are
    # not. 0.1 of a strip: 15 of 232 clean photos fired at 0.5, 2 at 0.1, for 5 points of edge recall.
    edge_max_box_frac: float = Field(0.1, gt=0, le=1, description="text lines larger than this share of a strip are not counted in edge_score")
    edge_threshold: float = Field(0.0, ge=0, le=1, description="reject when the edge strips' text score is above this (0: any credit-sized text line)")
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard; keep equal to ingest.max_pixels")
    workers: int = Field(2, ge=1, description="images decoded and detected at once; onnxruntime releases the GIL")
    # 0: share the machine's cores between workers (workers x threads = cores), so nothing oversubscribes.
    threads_per_worker: int = Field(0, ge=0)
    # The cascade's uncertain band of text scores (used only when clip or vlm is configured), around the
    # threshold: outside it the detector decides as without the cascade. 0.005-0.05 on the evaluation
    # (measured on the plain image; the detail layer moves few scores): the clean photos above 0.005 are
    # those with real text (can labels; coins' lettering scores 0.67 on the detail layer, above the band),
    # and most text stamps the detector sees faintly are in it; ~16 % of all its images go on to CLIP.
    band_low: float = Field(0.005, ge=0, le=1, description="text scores below this are kept by the text detector")
    band_high: float = Field(0.05, ge=0, le=1, description="text scores at or above this are rejected by the text detector")
    # With a learned head (the stage's --head folder, made by the watermark_head stage) its calibrated
    # combiner of head and text scores decides instead of `threshold`; null: the threshold the head was
    # calibrated with (the lowest that keeps 98 % of its synthetic clean calibration images).
    head_threshold: float | None = Field(None, gt=0, lt=1, description="reject when the head's combined P(watermark) is above this; null: the head's own")
    clip: ClipStep | None = Field(None, description="CLIP zero-shot for band images; null: no CLIP step")
    vlm: VlmStep | None = Field(None, description="vision-language model for band images CLIP left open; null (or model null): no VLM step")

    @model_validator(mode="after")
    def _band_around_threshold(self) -> "WatermarkConfig":
        if self.cascade_on and not self.band_low <= self.threshold < self.band_high:
            raise ValueError(f"need band_low <= threshold < band_high (got {self.band_low} <= {self.threshold} < {self.band_high}): "
                             "outside the band the text detector decides by the threshold")
        return self

    @property
    def vlm_on(self) -> bool:
        return self.vlm is not None and self.vlm.model is not None

    @property
    def cascade_on(self) -> bool:
        return self.clip is not None or self.vlm_on


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


def detector_model(cfg: WatermarkConfig, model_path: Path | str | None = None) -> Path:
    """The ONNX file the detector runs: ``model_path`` as given, else the bundled one, in int8 when
    ``cfg.detector_int8`` (quantized on first use, then cached)."""
    if model_path:
        return checked_model_path(model_path)
    path = checked_model_path(None)
    if cfg.detector_int8:
        from stagewise.curation.int8 import int8_model

        path = int8_model(path)
    return path


def detector_fingerprint(cfg: WatermarkConfig, model_path: Path) -> str:
    """Everything that changes the stored boxes, and nothing that only changes the decision."""
    from importlib.metadata import version

    return fingerprint(
        "watermark-detector", DETECTOR_VERSION, version("rapidocr"), model_path.name, sha256_file(model_path),
        {"limit_side_len": cfg.limit_side_len, "resample": "bicubic", "box_thresh": cfg.box_thresh,
         "highpass_sigma_px": cfg.highpass_sigma_px, "highpass_gain": cfg.highpass_gain,
         "edge_strip_frac": cfg.edge_strip_frac, "edge_side_px": cfg.edge_side_px},
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

        self.model_path = detector_model(cfg, model_path)
        self.limit_side_len = cfg.limit_side_len
        self.highpass_sigma_px, self.highpass_gain = cfg.highpass_sigma_px, cfg.highpass_gain
        self.edge_strip_frac, self.edge_side_px = cfg.edge_strip_frac, cfg.edge_side_px
        self._engine = RapidOCR(params={
            "Global.use_det": True,
            "Global.use_cls": False,
            "Global.use_rec": False,
            "Global.log_level": "error",  # it warns once per image without text, which is most of them
            "Det.model_path": str(self.model_path),  # explicit: never fall back to a download
            # We shrink every input ourselves (the image to limit_side_len, the strips to edge_side_px); this
            # limit only has to leave both as they are, and "max" never enlarges small images.
            "Det.limit_side_len": max(cfg.limit_side_len, cfg.edge_side_px),
            "Det.limit_type": "max",
            "Det.box_thresh": cfg.box_thresh,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })

    def prepare(self, img: Image.Image) -> Image.Image:
        """Shrink so the longer side is at most ``limit_side_len``, then take the detail layer (both part of
        the detector fingerprint). Box coordinates are in this image's pixels."""
        return self.detail(shrunk(img, self.limit_side_len))

    def edge_strips(self, img: Image.Image) -> tuple[Image.Image, int]:
        """(the top and bottom strips of ``img`` shrunk to ``edge_side_px``, each as its detail layer, stacked
        with a grey gap between them; the rows of one strip). One detector input for both: the detector
        boxes a lone strip a few dozen rows tall as one whole line."""
        img = shrunk(img, self.edge_side_px)
        rows = min(img.height, max(16, round(self.edge_strip_frac * img.height)))
        gap = EDGE_GAP_PX
        canvas = Image.new("RGB", (img.width, 2 * rows + gap), (128, 128, 128))  # 128: the detail layer's "no detail"
        canvas.paste(self.detail(img.crop((0, 0, img.width, rows))), (0, 0))
        canvas.paste(self.detail(img.crop((0, img.height - rows, img.width, img.height))), (0, rows + gap))
        return canvas, rows

    def detail(self, img: Image.Image) -> Image.Image:
        """(image - blur) x gain + grey: the detail layer the detector sees (the plain image when sigma is 0)."""
        if not self.highpass_sigma_px:
            return img
        blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(self.highpass_sigma_px)), dtype=np.float32)
        detail = (np.asarray(img, dtype=np.float32) - blurred) * self.highpass_gain + 128.0
        return Image.fromarray(np.clip(detail, 0, 255).astype(np.uint8))

    def memo(self, img: Image.Image) -> dict:
        """What the stage stores per image: the boxes of the whole image and of its edge strips, with the
        pixel sizes they are measured in."""
        prepared = self.prepare(img)
        out = {"input_width": prepared.width, "input_height": prepared.height, "boxes": json.dumps(self.detect(prepared)),
               "edge_width": 0, "edge_rows": 0, "edge_boxes": "[]"}
        if self.edge_strip_frac > 0:
            strips, rows = self.edge_strips(img)
            out.update(edge_width=strips.width, edge_rows=rows, edge_boxes=json.dumps(self.detect(strips)))
        return out

    def detect(self, img: Image.Image) -> list[list[float]]:
        """Text boxes in ``img``'s pixel coordinates: [x0, y0, x1, y1, x2, y2, x3, y3, confidence] each."""
        result = self._engine(img)  # RGB PIL image in; rapidocr converts to its BGR itself
        boxes, scores = getattr(result, "boxes", None), getattr(result, "scores", None)
        if boxes is None or scores is None or len(boxes) == 0:
            return []
        return [[round(float(v), 1) for v in np.asarray(box).reshape(-1)] + [round(float(s), 4)] for box, s in zip(boxes, scores)]


EDGE_GAP_PX = 32  # grey rows between the stacked strips: no detector box spans both


def shrunk(img: Image.Image, side_px: int) -> Image.Image:
    """``img`` with its longer side at most ``side_px`` (bicubic; never enlarged)."""
    if max(img.size) <= side_px:
        return img
    img = img.copy()
    img.thumbnail((side_px, side_px), Image.BICUBIC)
    return img


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


def score_boxes(boxes: list[list[float]], width_px: int, height_px: int, min_line_aspect: float, max_box_frac: float = 1.0) -> TextScore:
    """Text lines' area over ``width_px`` x ``height_px``, weighted by confidence; boxes squatter than
    ``min_line_aspect`` or larger than ``max_box_frac`` of that area are left out."""
    area_px = max(width_px * height_px, 1)
    score = covered = max_conf = 0.0
    lines = ignored = 0
    for box in boxes:
        area, aspect = box_geometry(box)
        if aspect < min_line_aspect or area > max_box_frac * area_px:
            ignored += 1
            continue
        confidence = box[8]
        lines += 1
        covered += area / area_px
        score += area / area_px * confidence
        max_conf = max(max_conf, confidence)
    # Overlapping boxes could sum past the whole image; the score is a fraction, so cap it.
    return TextScore(min(score, 1.0), min(covered, 1.0), max_conf, lines, ignored)


def text_scorer(cfg: WatermarkConfig, model_path: Path | None = None):
    """``score(img) -> (score, edge_score)``: the text scores the stage computes for an image (one detector
    session, one thread); the watermark head's combiner is calibrated with them."""
    detector = TextDetector(cfg, model_path, threads=1)

    def score(img: Image.Image) -> tuple[float, float]:
        memo = detector.memo(img)
        return text_score(memo, cfg).score, edge_score(memo, cfg)

    return score


def text_score(memo: dict, cfg: WatermarkConfig) -> TextScore:
    return score_boxes(json.loads(memo["boxes"]), int(memo["input_width"]), int(memo["input_height"]), cfg.min_line_aspect)


def edge_score(memo: dict, cfg: WatermarkConfig) -> float:
    """The edge strips' score: credit-sized text lines over one strip's area (0 with the strips off)."""
    if not int(memo["edge_rows"]):
        return 0.0
    return score_boxes(json.loads(memo["edge_boxes"]), int(memo["edge_width"]), int(memo["edge_rows"]), cfg.min_line_aspect, cfg.edge_max_box_frac).score


def decide(memo: dict, cfg: WatermarkConfig) -> dict:
    """Status, reason and score columns from memoised boxes, decided by the text detector alone."""
    s, edge = text_score(memo, cfg), edge_score(memo, cfg)
    reason, decided_by = "", DECIDED_BY_DETECTOR
    if s.score > cfg.threshold:
        reason = f"watermark: text detector score {s.score:.3f} > threshold {cfg.threshold:g}"
    elif cfg.edge_strip_frac > 0 and edge > cfg.edge_threshold:
        reason = f"watermark: text along the top or bottom edge, edge score {edge:.4f} > edge_threshold {cfg.edge_threshold:g}"
        decided_by = DECIDED_BY_EDGE
    return {
        "status": "rejected" if reason else "kept", "reason": reason, "score": s.score, "edge_score": edge, "text_area_frac": s.text_area_frac,
        "max_confidence": s.max_confidence, "n_boxes": s.n_boxes, "n_ignored_boxes": s.n_ignored_boxes,
        "head_score": math.nan, "head_edge_score": math.nan, "head_lit_frac": math.nan, "head_p": math.nan,
        "clip_p": math.nan, "vlm_answers": "", "decided_by": decided_by,
    }


def decide_with_head(decision: dict, scores: dict, head, cfg: WatermarkConfig) -> dict:
    """The head's combiner (whole and strip scores, lit share, text score) on top of the text detector's decision: an
    image the text detector rejects stays rejected (its threshold was chosen on real photos; the
    combiner's on synthetic ones), and the head adds the marks the text detector does not see."""
    heads = {key: float(scores[key]) for key in ("head_score", "head_edge_score", "head_lit_frac")}
    p = head.probability(**heads, text_score=decision["score"], text_edge_score=decision["edge_score"])
    threshold = cfg.head_threshold if cfg.head_threshold is not None else float(head.meta["threshold"])
    out = {**decision, **heads, "head_p": p}
    if decision["status"] == "rejected" or p <= threshold:
        return out
    reason = f"watermark: learned head P={p:.3f} > {threshold:.3f} (head score {heads['head_score']:.2f}, edges {heads['head_edge_score']:.2f}, text score {decision['score']:.3f})"
    return {**out, "status": "rejected", "reason": reason, "decided_by": DECIDED_BY_HEAD}


def uncertain(score: float, cfg: WatermarkConfig) -> bool:
    """Whether the cascade sends this text score on to CLIP / the VLM."""
    return cfg.cascade_on and cfg.band_low <= score < cfg.band_high


def clip_decision(p: float, score: float, cfg: WatermarkConfig) -> dict | None:
    """CLIP's decision on a band image, or None when it leaves the image to the VLM."""
    step = cfg.clip
    assert step is not None
    if p > step.threshold:
        return {"status": "rejected", "reason": f"watermark: CLIP p={p:.3f} > {step.threshold:g} (uncertain text score {score:.3f})", "decided_by": DECIDED_BY_CLIP}
    if cfg.vlm_on and p >= step.keep_below:
        return None
    return {"status": "kept", "reason": "", "decided_by": DECIDED_BY_CLIP}


def vlm_decision(answers: dict[str, str], score: float, p: float, cfg: WatermarkConfig) -> dict:
    assert cfg.vlm is not None
    hits = [f"VLM answered {answers.get(q.text, '')!r} to {q.text!r}" for q in cfg.vlm.questions if matching(answers.get(q.text, ""), q.reject) is not None]
    if not hits:
        return {"status": "kept", "reason": "", "decided_by": DECIDED_BY_VLM}
    evidence = f"uncertain text score {score:.3f}" + ("" if math.isnan(p) else f", CLIP p={p:.3f}")
    return {"status": "rejected", "reason": f"watermark: {'; '.join(hits)} ({evidence})", "decided_by": DECIDED_BY_VLM}


# ------------------------------------------------------------------------------------------------ stage


def score_images(
    manifest: pd.DataFrame, cfg: WatermarkConfig, store_dir: Path, model_path: Path | None = None,
    clip_store: Path | None = None, vlm_store: Path | None = None, head_dir: Path | None = None,
) -> tuple[pd.DataFrame, int]:
    """One row per manifest-kept image, kept or rejected with a reason; and how many images went through
    the detector (the rest were memoised). See ``run_cascade`` for the arguments and the other counts."""
    frame, counts = run_cascade(manifest, cfg, store_dir, model_path, clip_store, vlm_store, head_dir)
    return frame, counts["detected"]


def run_cascade(
    manifest: pd.DataFrame, cfg: WatermarkConfig, store_dir: Path, model_path: Path | None = None,
    clip_store: Path | None = None, vlm_store: Path | None = None, head_dir: Path | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per manifest-kept image, kept or rejected with a reason naming the deciding step; and this
    run's counts: ``detected`` (images the text detector ran on), ``uncertain`` (in the band),
    ``clip_embedded`` and ``vlm_asked`` (images those models ran on; the rest were memoised).

    CLIP embeddings are memoised in ``clip_store`` (default ``store_dir/clip``; the stage shares one with
    near_dup), VLM answers in ``vlm_store`` (default ``store_dir/vlm``). With ``head_dir`` (a folder made by
    the watermark_head stage) the learned head's scores are memoised in ``store_dir/head`` by content hash
    + the head's model hash, and its combiner decides (``headed`` counts the images it ran on); the
    cascade, when configured, still refines images whose text score is in the band."""
    kept = manifest[manifest["status"] == "kept"]
    requested, model_path = model_path, detector_model(cfg, model_path)
    # Locate the cascade's models first: a missing one fails in a second, not after the detector's hour.
    embedder = Embedder(cfg.clip, Path(clip_store or Path(store_dir) / "clip"), "watermark.clip") if cfg.clip is not None else None
    if cfg.vlm_on:
        locate_vlm(cfg.vlm.model, section="watermark.vlm", revision=cfg.vlm.revision)
    head = None
    if head_dir is not None:
        from stagewise.curation import wmhead

        head = wmhead.load(head_dir)  # before any detector work: a missing head fails at once, naming its path
    memo, errors, detected = detect_new(kept, cfg, Path(store_dir), model_path, requested)
    head_scores, headed = {}, 0
    if head is not None:
        head_scores, head_errors, headed = score_with_head(kept, cfg, head, Path(store_dir) / "head")
        errors.update(head_errors)

    decisions: dict[str, dict] = {}
    for row in kept.drop_duplicates("sha256").itertuples(index=False):
        if row.sha256 not in errors:
            decisions[row.sha256] = decide(memo[row.sha256], cfg)
            if head is not None:
                decisions[row.sha256] = decide_with_head(decisions[row.sha256], head_scores[row.sha256], head, cfg)
    # The band is about the whole-image score: a credit the edge strips found is not CLIP's to keep.
    band = [sha for sha, d in decisions.items() if uncertain(d["score"], cfg) and d["decided_by"] != DECIDED_BY_EDGE]
    counts = {"detected": detected, "headed": headed, "head_on": int(head is not None), "uncertain": len(band), "clip_embedded": 0, "vlm_asked": 0}

    to_vlm = band
    if embedder is not None and band:
        rows = kept[kept["sha256"].isin(band)]
        result = embedder.images(rows, desc="watermark clip")
        errors.update(result.errors)
        counts["clip_embedded"] = result.embedded
        scored = [sha for sha in band if sha in result.embeddings]
        probs = zero_shot(np.stack([result.embeddings[sha] for sha in scored]), list(cfg.clip.prompts), embedder) if scored else []
        to_vlm = []
        for sha, p in zip(scored, probs):
            decisions[sha]["clip_p"] = float(p)
            step = clip_decision(float(p), decisions[sha]["score"], cfg)
            if step is None:
                to_vlm.append(sha)
            else:
                decisions[sha].update(step)
    if cfg.vlm_on and to_vlm:
        result = answers_for(kept[kept["sha256"].isin(to_vlm)], cfg.vlm, Path(vlm_store or Path(store_dir) / "vlm"), section="watermark.vlm")
        errors.update(result.errors)
        counts["vlm_asked"] = result.asked
        for sha in to_vlm:
            if sha in result.answers:
                got = result.answers[sha]
                decisions[sha].update(vlm_decision(got, decisions[sha]["score"], decisions[sha]["clip_p"], cfg), vlm_answers=json.dumps(got, sort_keys=True))

    rows = []
    for row in kept.itertuples(index=False):
        base = {"path": row.path, "domain": row.domain, "sha256": row.sha256}
        if row.sha256 in errors:
            rows.append({**base, "status": "rejected", "reason": errors[row.sha256], "score": math.nan, "edge_score": math.nan, "text_area_frac": math.nan,
                         "max_confidence": math.nan, "n_boxes": 0, "n_ignored_boxes": 0, "head_score": math.nan, "head_edge_score": math.nan, "head_lit_frac": math.nan,
                         "head_p": math.nan, "clip_p": math.nan, "vlm_answers": "",
                         "decided_by": DECIDED_BY_DECODE})
        else:
            rows.append({**base, **decisions[row.sha256]})
    frame = pd.DataFrame(rows, columns=COLUMNS).astype(
        {"score": "float64", "edge_score": "float64", "text_area_frac": "float64", "max_confidence": "float64", "n_boxes": "int64", "n_ignored_boxes": "int64",
         "head_score": "float64", "head_edge_score": "float64", "head_lit_frac": "float64", "head_p": "float64", "clip_p": "float64"}
    )
    return frame, counts


def detect_new(kept: pd.DataFrame, cfg: WatermarkConfig, store_dir: Path, model_path: Path, requested: Path | None = None) -> tuple[dict, dict[str, str], int]:
    """Detector boxes for every kept image, running the detector only on images not memoised.
    Returns (boxes etc. by sha256, decode errors by sha256, how many images the detector ran on).
    ``model_path`` is the resolved model, ``requested`` the one the caller named (None: the bundled one)."""
    threads = threads_for(cfg)
    local = ThreadLocal()  # one onnxruntime session per worker: each owns `threads` cores (empty again on a cluster worker)

    def detect(row) -> dict:  # in a worker thread: rapidocr runs one image at a time, so the workers run it
        img = load_verified(row.path, row.sha256, cfg.max_pixels)
        if not hasattr(local, "detector"):
            log.info("text detector: a session of %d onnxruntime threads for one of %d workers", threads, cfg.workers)
            # A cluster worker on another machine lacks this machine's int8 cache file: it builds its own.
            local.detector = TextDetector(cfg, model_path if model_path.is_file() else requested, threads)
        return local.detector.memo(img)

    result = memo_map(kept, ResultStore(store_dir, detector_fingerprint(cfg, model_path)), detect, workers=cfg.workers, desc="watermark")
    return result.values, result.errors, result.computed


def score_with_head(kept: pd.DataFrame, cfg: WatermarkConfig, head, store_dir: Path) -> tuple[dict, dict[str, str], int]:
    """The learned head's (head_score, head_edge_score, head_lit_frac) for every kept image, computing only images not
    memoised under this head's model hash. A pure function of (image, head) per row, like the detector's."""
    from stagewise.curation.wmhead import HEAD_VERSION

    def score(row) -> dict:
        return head.score_image(load_verified(row.path, row.sha256, cfg.max_pixels))

    import torch

    store = ResultStore(store_dir, fingerprint("watermark-head-scores", HEAD_VERSION, head.model_hash))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_for(cfg))  # workers x threads = cores: oversubscribed torch threads crawl
    try:
        result = memo_map(kept, store, score, workers=cfg.workers, desc="watermark head")
    finally:
        torch.set_num_threads(threads)
    return result.values, result.errors, result.computed


def summarize(frame: pd.DataFrame) -> str:
    rejected = frame[frame["status"] != "kept"]
    kept_scores = frame.loc[frame["status"] == "kept", "score"]
    by_step = ", ".join(f"{n} by {step}" for step, n in rejected["decided_by"].value_counts().items())
    lines = [f"{len(frame) - len(rejected)} kept, {len(rejected)} rejected of {len(frame)} images" + (f" ({by_step})" if by_step else "")]
    if len(kept_scores):
        lines.append(f"  highest kept score {kept_scores.max():.3f}")
    for row in rejected.head(20).itertuples(index=False):  # enough to see what kind; the Parquet has all
        lines.append(f"  {row.path}: {row.reason}")
    if len(rejected) > 20:
        lines.append(f"  ... and {len(rejected) - 20} more")
    return "\n".join(lines)
