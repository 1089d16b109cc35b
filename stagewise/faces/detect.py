"""mediapipe's bundled face detector (full range) and face mesh (478 landmarks), both shipped in the wheel.

The legacy ``mp.solutions`` API is used because its models are inside the wheel; the tasks API needs
``.task`` files that are not. The detector finds every face and scores it; the mesh then runs on a square
crop around each detection (twice its box), so a small face in a large photo gets the mesh's full input
resolution, each landmark set belongs to one scored detection, and ``max_faces`` is a count of
detections. Graphs are not thread-safe: ``finder()`` keeps one per thread.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np

# protobuf 4.25 warns on every mediapipe result (its own deprecated call, not ours)
warnings.filterwarnings("ignore", message=r"SymbolDatabase\.GetPrototype\(\) is deprecated")

DETECTOR_FLOOR = 0.3  # the detector's own threshold: faces scoring between this and min_confidence get a reason row
MESH_CONTEXT = 2.0  # the mesh's crop is this many times the detection box: its own detector needs context
MESH_INPUT_PX = 384  # crops are resized to this side for the mesh (it works at 192-256 px internally)
DETECTOR_VERSION = "mediapipe-0.10.14/face_detection_full_range+face_mesh_refined"  # part of every memo key


@dataclass(frozen=True)
class Detection:
    score: float
    box: tuple[float, float, float, float]  # x0, y0, width, height in pixels

    @property
    def size_px(self) -> float:
        return max(self.box[2], self.box[3])


def _quiet_import():
    """Import mediapipe with its C++ (glog / absl) and protobuf chatter turned down to errors."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mediapipe as mp
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl comes with mediapipe; harmless if a future wheel drops it
        pass
    logging.getLogger("mediapipe").setLevel(logging.ERROR)
    return mp


class FaceFinder:
    def __init__(self):
        mp = _quiet_import()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # model_selection=1: the full-range model (faces up to 5 m), for photos and video frames alike
            self._detector = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=DETECTOR_FLOOR)
            self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.3)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Every face the detector finds in an RGB uint8 HWC image, best score first."""
        h, w = rgb.shape[:2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = self._detector.process(np.ascontiguousarray(rgb))
        out = []
        for det in result.detections or []:
            box = det.location_data.relative_bounding_box
            out.append(Detection(float(det.score[0]), (box.xmin * w, box.ymin * h, box.width * w, box.height * h)))
        return sorted(out, key=lambda d: -d.score)

    def landmarks(self, rgb: np.ndarray, det: Detection) -> np.ndarray | None:
        """(478, 2) landmark pixels of one detected face in ``rgb``, or None when the mesh rejects it."""
        import cv2

        x0, y0, bw, bh = det.box
        side = max(bw, bh) * MESH_CONTEXT
        cx, cy = x0 + bw / 2, y0 + bh / 2
        scale = MESH_INPUT_PX / side
        # source -> mesh crop: scale about the box centre; outside the image is black
        mat = np.array([[scale, 0, MESH_INPUT_PX / 2 - scale * cx], [0, scale, MESH_INPUT_PX / 2 - scale * cy]], np.float64)
        crop = cv2.warpAffine(rgb, mat, (MESH_INPUT_PX, MESH_INPUT_PX), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        pts = np.array([(p.x, p.y) for p in result.multi_face_landmarks[0].landmark], np.float64) * MESH_INPUT_PX
        return (pts - mat[:, 2]) / scale  # back to source pixels

    def close(self) -> None:
        self._detector.close()
        self._mesh.close()


_local = threading.local()


def finder() -> FaceFinder:
    """This thread's FaceFinder (built on first use)."""
    found = getattr(_local, "finder", None)
    if found is None:
        found = _local.finder = FaceFinder()
    return found
