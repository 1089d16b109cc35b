"""Masks from landmarks, in the aligned crop's pixels.

- ``face_mask``: DFL's whole-face hull: the convex hull of the face outline with the forehead extended
  above the brows (DFL's ``get_image_hull_mask`` lifts the brows 1.5x their height over the eye line;
  here every brow point moves up by that much and joins mediapipe's face oval in the hull).
- ``eyes_mouth_mask``: DFL's ``get_image_eye_mask`` + mouth: the hulls of each eye and of the lips,
  dilated by 1/32 of the crop so the lids and lip edges are inside (DFL's eyes_mouth_prio weights these).

Both are uint8 (0 or 255) arrays of the crop's size. ``mask_image`` packs them into one RGB PNG (red =
face, green = eyes and mouth), the file the align stage stores beside each crop.
"""

from __future__ import annotations

import numpy as np

FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149,
             150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]  # fmt: skip
BROW_RIGHT = [70, 63, 105, 66, 107, 55, 65, 52, 53, 46]
BROW_LEFT = [300, 293, 334, 296, 336, 285, 295, 282, 283, 276]
EYE_RIGHT = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246]
EYE_LEFT = [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]
LIPS = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185]
FOREHEAD_LIFT = 1.5  # DFL: the brows moved to 1.5x their height above the eye line
MASK_VERSION = 1  # bump when a mask changes: part of the align stage's memo key


def _hull(size_px: int, pts: np.ndarray) -> np.ndarray:
    import cv2

    out = np.zeros((size_px, size_px), np.uint8)
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    cv2.fillConvexPoly(out, hull, 255, lineType=cv2.LINE_AA)
    return np.where(out >= 128, 255, 0).astype(np.uint8)


def face_mask(landmarks: np.ndarray, size_px: int) -> np.ndarray:
    """The whole-face hull with the forehead extended; ``landmarks`` in crop pixels."""
    lifted = []
    for brow, eye in ((BROW_RIGHT, EYE_RIGHT), (BROW_LEFT, EYE_LEFT)):
        eye_line = landmarks[eye].mean(0)
        lifted.append(eye_line + FOREHEAD_LIFT * (landmarks[brow] - eye_line))
    return _hull(size_px, np.concatenate([landmarks[FACE_OVAL], *lifted]))


def eyes_mouth_mask(landmarks: np.ndarray, size_px: int) -> np.ndarray:
    import cv2

    out = np.maximum.reduce([_hull(size_px, landmarks[part]) for part in (EYE_RIGHT, EYE_LEFT, LIPS)])
    grow = max(1, size_px // 32)
    return cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))


def mask_image(landmarks: np.ndarray, size_px: int) -> np.ndarray:
    """(size, size, 3) uint8: red = face mask, green = eyes and mouth, blue = 0."""
    out = np.zeros((size_px, size_px, 3), np.uint8)
    out[..., 0] = face_mask(landmarks, size_px)
    out[..., 1] = eyes_mouth_mask(landmarks, size_px)
    return out
