"""Merging a swapped face back into its frame, as DFL's merger does: colour transfer, mask, inverse warp.

- ``color_transfer``: ``rct`` (Reinhard et al. 2001: per-channel mean and spread in L*a*b*, inside the
  mask, matched to the original face) or ``lct`` (linear colour transfer: the PCA map between the two
  colour covariances), or ``none``.
- ``blend_mask``: the face hull in crop pixels, eroded by ``erode_px`` and feathered by a gaussian of
  ``blur_px`` (DFL's "erode" and "blur" merger settings), so the seam falls inside the face.
- ``paste``: the crop and its mask warped back with the inverse of the align transform and composited.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ColorTransfer = Literal["none", "rct", "lct"]


def _lab(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def rct(face: np.ndarray, like: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``face`` recoloured so that its L*a*b* mean and spread inside ``mask`` match ``like``'s."""
    import cv2

    inside = mask > 0.5
    if inside.sum() < 16:
        return face
    src, ref = _lab(face), _lab(like)
    out = src.copy()
    for c in range(3):
        s, r = src[..., c][inside], ref[..., c][inside]
        out[..., c] = (src[..., c] - s.mean()) * (r.std() / max(float(s.std()), 1e-6)) + r.mean()
    out = np.clip(out, [0, -127, -127], [100, 127, 127]).astype(np.float32)
    return np.clip(cv2.cvtColor(out, cv2.COLOR_LAB2RGB) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _sqrtm(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    return vecs @ np.diag(np.sqrt(np.clip(vals, 1e-8, None))) @ vecs.T


def lct(face: np.ndarray, like: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Linear colour transfer (PCA mode): the affine map taking ``face``'s colour distribution inside the mask to ``like``'s."""
    inside = mask > 0.5
    if inside.sum() < 16:
        return face
    s, r = face[inside].astype(np.float64) / 255.0, like[inside].astype(np.float64) / 255.0
    mu_s, mu_r = s.mean(0), r.mean(0)
    cov_s, cov_r = np.cov(s.T) + 1e-5 * np.eye(3), np.cov(r.T) + 1e-5 * np.eye(3)
    a = _sqrtm(cov_r) @ np.linalg.inv(_sqrtm(cov_s))
    out = (face.reshape(-1, 3) / 255.0 - mu_s) @ a.T + mu_r
    return np.clip(out.reshape(face.shape) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def color_transfer(kind: ColorTransfer, face: np.ndarray, like: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if kind == "rct":
        return rct(face, like, mask)
    if kind == "lct":
        return lct(face, like, mask)
    return face


def blend_mask(hull: np.ndarray, erode_px: int, blur_px: int) -> np.ndarray:
    """uint8 hull (0/255) -> float32 [0, 1] mask, eroded then feathered."""
    import cv2

    mask = hull.astype(np.float32) / 255.0
    if erode_px > 0:
        mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1, 2 * erode_px + 1)))
    if blur_px > 0:
        mask = cv2.GaussianBlur(mask, (2 * blur_px + 1, 2 * blur_px + 1), 0)
    return np.clip(mask, 0, 1)


def paste(frame: np.ndarray, crop: np.ndarray, mask: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """``crop`` (aligned by ``mat``: frame -> crop pixels) composited into ``frame`` through ``mask``."""
    import cv2

    h, w = frame.shape[:2]
    flags = cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP
    back = cv2.warpAffine(crop, mat, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, mat, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0, 1)[..., None]
    out = frame.astype(np.float32) * (1 - alpha) + back.astype(np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
