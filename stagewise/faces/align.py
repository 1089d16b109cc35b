"""DFL's face types: a similarity transform of the landmarks to a canonical face, padded per face type.

As DeepFaceLab's ``LandmarksProcessor.get_transform_mat``: Umeyama's least-squares similarity maps 33
landmarks (brows, nose, eyes, mouth corners of the 68-point iBUG layout) onto DFL's mean face in a unit
square; the unit square's corners in the photo give the face's centre and diagonals; the crop is that
square grown by the face type's padding (``whole_face`` 0.40, ``head`` 0.70), moved up 7 % (whole face:
more forehead) or 50 % (head). DFL's head type also shifts sideways by the estimated yaw; that needs 3-D
landmarks and is left out here. mediapipe's 478-point mesh is mapped to the 33 iBUG points by index.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

FaceType = Literal["whole_face", "head"]
PADDING = {"whole_face": 0.40, "head": 0.70}  # DFL FaceType_to_padding_remove_align
LIFT = {"whole_face": 0.07, "head": 0.50}  # DFL: the centre moves up by this fraction of the square's side

# DFL's landmarks_2D_new: the mean face of iBUG points 17-47, 48 and 54, in a unit square.
MEAN_FACE = np.array([
    [0.000213256, 0.106454], [0.0752622, 0.038915], [0.18113, 0.0187482], [0.29077, 0.0344891], [0.393397, 0.0773906],
    [0.586856, 0.0773906], [0.689483, 0.0344891], [0.799124, 0.0187482], [0.904991, 0.038915], [0.98004, 0.106454],
    [0.490127, 0.203352], [0.490127, 0.307009], [0.490127, 0.409805], [0.490127, 0.515625],
    [0.36688, 0.587326], [0.426036, 0.609345], [0.490127, 0.628106], [0.554217, 0.609345], [0.613373, 0.587326],
    [0.121737, 0.216423], [0.187122, 0.178758], [0.265825, 0.179852], [0.334606, 0.231733], [0.260918, 0.245099], [0.182743, 0.244077],
    [0.645647, 0.231733], [0.714428, 0.179852], [0.793132, 0.178758], [0.858516, 0.216423], [0.79751, 0.244077], [0.719335, 0.245099],
    [0.254149, 0.780233], [0.726104, 0.780233],
])  # fmt: skip
# The mediapipe mesh index of each MEAN_FACE point (iBUG 17-26 brows, 27-35 nose, 36-47 eyes, 48 and 54 mouth corners).
MESH_OF_MEAN_FACE = np.array([
    46, 53, 52, 65, 55, 285, 295, 282, 283, 276,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 291,
])  # fmt: skip


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that best maps ``src`` points onto ``dst`` (Umeyama 1991)."""
    n = len(src)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / n
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    out = np.zeros((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = mu_d - scale * rot @ mu_s
    return out


def apply(mat: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ mat[:, :2].T + mat[:, 2]


def invert(mat: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine."""
    full = np.vstack([mat, [0, 0, 1]])
    return np.linalg.inv(full)[:2]


def transform(landmarks: np.ndarray, size_px: int, face_type: FaceType) -> np.ndarray:
    """The 2x3 affine from photo pixels to the ``size_px`` aligned crop of ``face_type`` (DFL get_transform_mat)."""
    to_unit = umeyama(landmarks[MESH_OF_MEAN_FACE], MEAN_FACE)
    from_unit = invert(to_unit)
    corners = apply(from_unit, np.array([(0, 0), (1, 0), (1, 1), (0, 1), (0.5, 0.5)], np.float64))
    centre = corners[4].copy()
    tb = corners[2] - corners[0]
    tb /= np.linalg.norm(tb)
    bt = corners[1] - corners[3]
    bt /= np.linalg.norm(bt)
    mod = np.linalg.norm(corners[0] - corners[2]) * (PADDING[face_type] * np.sqrt(2.0) + 0.5)
    up = corners[0] - corners[3]  # the square's left edge, bottom to top
    centre += up * LIFT[face_type]
    three = np.array([centre - tb * mod, centre + bt * mod, centre + tb * mod])
    target = np.array([(0, 0), (size_px, 0), (size_px, size_px)], np.float64)
    return _affine_from_3(three, target)


def _affine_from_3(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def face_size_px(landmarks: np.ndarray) -> float:
    """The face's size in photo pixels: the side of DFL's unit square (brows to mouth, ear to ear less the ears)."""
    to_unit = umeyama(landmarks[MESH_OF_MEAN_FACE], MEAN_FACE)
    return float(1.0 / np.sqrt(abs(np.linalg.det(to_unit[:, :2]))))


def warp(rgb: np.ndarray, mat: np.ndarray, size_px: int) -> np.ndarray:
    """The aligned crop; outside the photo is edge-replicated (a black band would be learned as part of the face)."""
    import cv2

    return cv2.warpAffine(rgb, mat, (size_px, size_px), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REPLICATE)


def yaw_ratio(landmarks: np.ndarray) -> float:
    """How far the nose tip sits from the eyes' midline, in eye distances: ~0 frontal, ~0.5 and more near profile."""
    left, right, nose = landmarks[263], landmarks[33], landmarks[4]
    eyes = right - left
    dist = np.linalg.norm(eyes)
    if dist < 1e-6:
        return float("inf")
    mid = (left + right) / 2
    return float(abs(np.dot(nose - mid, eyes / dist)) / dist)
