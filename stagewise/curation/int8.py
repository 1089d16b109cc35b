"""rapidocr's text detector in int8: the float32 model in its wheel, quantized here once per machine.

The float32 PP-OCRv6 det small costs 150-250 ms per 512 px input on one core, and the watermark stage runs
it twice per image (the whole image, then the edge strips). Static int8 quantization (onnxruntime's
QOperator format: per-channel int8 weights, uint8 activations) runs it about 4x faster on one core, and
on benchmarks/watermark_eval.py it finds the same marks (README "Learned watermark head"). The activation
ranges are calibrated on the detector's own inputs (the detail layers of whole images and of their edge
strips) for synthetic training marks (``stagewise.curation.marks``) over the bundled photos, from a fixed
seed: never on evaluation data.

The file is written once, atomically, to ``~/.cache/stagewise/text-detector/`` (``STAGEWISE_CACHE``
overrides ``~/.cache/stagewise``), named by the float32 model's sha256 and ``INT8_RECIPE``. The watermark
stage keys its memo by the int8 file's own sha256: a machine whose quantization differs (the calibration
runs in float32) recomputes its boxes instead of mixing them with another's.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from stagewise.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

INT8_RECIPE = 1  # bump when the calibration set or the quantization settings change
CALIBRATION_IMAGES = 48  # each gives two inputs (whole image, edge strips); ranges settle well before 48
CALIBRATION_SEED = 123
_BUILD = threading.Lock()  # the stage's worker threads: one quantization per process


def cache_root() -> Path:
    return Path(os.environ.get("STAGEWISE_CACHE") or Path.home() / ".cache" / "stagewise")


def int8_model(src: Path) -> Path:
    """The int8 version of the float32 ONNX detector ``src``: from the cache, or quantized now (~30 s)."""
    out = cache_root() / "text-detector" / f"{src.stem}-{sha256_file(src)[:12]}-int8-v{INT8_RECIPE}.onnx"
    with _BUILD:
        if not out.is_file():
            log.info("quantizing the text detector to int8, once per machine (about 30 s): %s", out)
            quantize(src, out)
    return out


def quantize(src: Path, out: Path) -> None:
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnxruntime.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    feeds = iter([{name: x} for x in calibration_inputs(src)])

    class Feeds(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    with atomic_path(out) as tmp:
        quantize_static(str(src), str(tmp), Feeds(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def calibration_inputs(src: Path) -> list[np.ndarray]:
    """The float32 tensors the detector is fed (rapidocr's own pre-processing) for the whole images and the
    edge strips of ``CALIBRATION_IMAGES`` synthetic training images, a third of them clean."""
    from rapidocr.ch_ppocr_det.utils import DetPreProcess

    from stagewise.curation import marks, wmhead
    from stagewise.curation.watermark import TextDetector, WatermarkConfig

    cfg = WatermarkConfig()
    detector = TextDetector(cfg, src)  # for its pre-processing only: no session is opened
    to_tensor = DetPreProcess(max(cfg.limit_side_len, cfg.edge_side_px), "max")
    rng = np.random.default_rng(CALIBRATION_SEED)
    photos = [img for _, img in wmhead.bundled_photos()]
    inputs = []
    for i in range(CALIBRATION_IMAGES):
        kind = None if i % 3 == 0 else marks.random_kind(rng)
        img, _ = marks.synthesize(rng, wmhead.training_crop(rng, photos[rng.integers(len(photos))]), kind)
        for view in (detector.prepare(img), detector.edge_strips(img)[0]):
            inputs.append(to_tensor(np.asarray(view)[:, :, ::-1]))  # rapidocr feeds BGR
    return inputs
