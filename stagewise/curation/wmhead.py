"""The learned watermark head: a mask head on frozen EfficientNet-Lite0 features, plus a calibrated combiner.

The head is three convolutions on the backbone's stride-8 map (stride-8 and stride-16 features, 152 ch):
one logit per 8 x 8 px cell saying "a mark is drawn here", supervised by the synthetic mark's own coverage
mask (``stagewise.curation.marks``), plus an image-level term on the image score. It sees each image in
three views: the whole image at ``input_side_px``, and its top and bottom edge strips
(``edge_strip_frac`` of the height) at twice that resolution, where small credits and URLs sit: at
384 px a 2 % credit is 4-8 px tall, too small for 8 px cells, at 768 px it is twice that. Image
scores: the mean of the ``top_k`` highest cell logits of the whole view, the same of the strips (a small
credit in a corner lights a few cells; averaging the whole map would drown it), and the share of the
whole view's cells above 0 (tiled marks light many cells: a cheap periodicity / extent signal). Training's
image-level term takes the top_k over all views at once.

The combiner is a logistic regression on (whole score, strip score, lit share, the text detector's
whole-image and edge-strip scores), fitted on a separate calibration set of synthetic images drawn on
photo folders the head never trains on, so its output is a probability; kept apart, the strips' score
gets its own weight (clean photos' edges light more cells than their middles). ``threshold`` is the lowest probability that keeps
``calibration_keep`` of the calibration set's clean images.

Files: ``head.safetensors`` (head weights) and ``head.json`` (the training config, combiner weights,
threshold, backbone weights' sha256, the text detector settings it was calibrated with, and a hash of the
weights file). Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from stagewise.config import Section, fingerprint
from stagewise.curation import marks
from stagewise.curation.backbone import FEATURE_CHANNELS, load_backbone, weights_path
from stagewise.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

HEAD_FILE, META_FILE = "head.safetensors", "head.json"
# Bump when the head's architecture or score definition changes (2: edge-strip views, 3: their own score,
# 4: the text detector's edge score as a combiner input).
HEAD_VERSION = 4
COMBINER_FEATURES = ("head_score", "head_edge_score", "head_lit_frac", "text_score", "text_edge_score")
# Photos that ship inside installed packages, used as the clean backgrounds of the training marks. Left
# out: skimage's coins (real lettering), and everything that is not a photo (text, page, logo, synthetic).
SKIMAGE_TRAIN_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "grass", "gravel", "hubble_deep_field",
                        "immunohistochemistry", "moon", "retina", "rocket", "stereo_motorcycle")
CALIBRATION_EVERY = 3  # every third photo folder (a bundled photo: its own) is kept for calibration only
TRAIN_SHAPE_PX = (384, 288)  # (width, height) of every training image's whole view: one batch shape, 4:3 like most photos
EDGE_SCALE = 2  # the edge strips' resolution over the whole view's; training marks are drawn at this scale


class HeadTrainConfig(Section):
    # false (the default): the stage writes only a head.json saying so (in a second) and the watermark stage
    # decides by the text detector alone. Off by default because, trained on the bundled photos alone, the
    # head keeps only 62 % of held-out clean photos; with the user's photo_folders it kept 94-97 %
    # (benchmarks/watermark_eval.py, README). Turn it on, with photo_folders, to catch logos, small and tiled marks.
    enabled: bool = Field(False, description="train the learned head; false: the watermark stage uses the text detector alone")
    seed: int = Field(0, description="seeds the marks, the crops and the head's initialisation: same seed, same weights")
    # Folders of your own clean photos (no marks), drawn on besides the bundled ones, read only. One folder
    # per subject or source: whole folders are held out for calibration. Without them the calibration
    # does not carry to real photos (README "Learned watermark head"). DVC tracks this list, not the
    # folders' contents: rerun with `dvc repro -f watermark_head` after adding photos.
    photo_folders: list[str] = Field(default_factory=list)
    # The longer side the backbone sees, in training and in the stage. 384: small edge text (1.5-4 % of the
    # shorter side) is then 4-12 px tall, one or two cells; 512 would cost 1.8x per image.
    input_side_px: int = Field(384, ge=64)
    # Top and bottom strips of this share of the height, seen at twice the resolution (0: the whole view
    # only). 0.1 holds a credit 3 % of the shorter side from the edge and up to 4 % tall, as stock sites
    # place them; costs ~0.8x of the whole view's backbone pass.
    edge_strip_frac: float = Field(0.1, ge=0, le=0.5)
    # Training images, half of them clean (below). 1024 with 1500 steps and 32 channels against 192 / 250 /
    # 16 raised held-out recall at 95 % clean keep on every kind (logos 0.28 -> 0.42; README); the stage
    # then trains in 4-6 minutes on two cores (the 1500 head steps on one thread, for bit-identical weights,
    # and the backbone passes).
    train_images: int = Field(1024, ge=8)
    calibration_images: int = Field(256, ge=8, description="separate synthetic images, on other photos, the combiner is fitted on")
    clean_fraction: float = Field(0.5, gt=0, lt=1, description="share of clean (unmarked) images in both sets")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    hidden_channels: int = Field(32, ge=4)
    top_k: int = Field(4, ge=1, description="cells averaged into the image score")
    # Mark cells are few: weight them up so the head does not learn "never".
    pos_weight: float = Field(4.0, gt=0)
    calibration_keep: float = Field(0.98, gt=0, lt=1, description="share of the calibration set's clean images the threshold keeps")


class MaskHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(FEATURE_CHANNELS, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.mix(F.relu(self.reduce(feats)))))[:, 0]  # (N, H/8, W/8) logits


def image_scores(views: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of the top_k cell logits over all views, share of the whole view's cells with logit > 0) per
    image, from each view's (N, h, w) logits; the whole view first."""
    flat = torch.cat([logits.flatten(1) for logits in views], dim=1)
    k = min(top_k, flat.shape[1])
    return flat.topk(k, dim=1).values.mean(dim=1), (views[0].flatten(1) > 0).float().mean(dim=1)


def to_tensor(img: Image.Image, side_px: int) -> torch.Tensor:
    """RGB in [0, 1], (1, 3, H, W), the longer side shrunk to ``side_px`` (never enlarged)."""
    img = img.convert("RGB")
    if max(img.size) > side_px:
        scale = side_px / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def view_scores(views: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The combiner's head inputs per image: (whole view's top_k mean, the strips' top_k mean (the whole
    view's when there are none), the whole view's share of cells > 0)."""
    whole, lit = image_scores(views[:1], top_k)
    edge = image_scores(views[1:], top_k)[0] if len(views) > 1 else whole
    return whole, edge, lit


def strip_rows(height_px: int, strip_frac: float) -> int:
    """Rows of each edge strip of an image ``height_px`` tall at the strips' resolution."""
    return min(height_px, max(16, round(strip_frac * height_px)))


def views(img: Image.Image, side_px: int, strip_frac: float) -> list[torch.Tensor]:
    """The backbone's inputs for one image: the whole image at ``side_px``, then (``strip_frac`` > 0) its
    top and bottom strips at EDGE_SCALE times that."""
    whole = to_tensor(img, side_px)
    if strip_frac <= 0:
        return [whole]
    big = to_tensor(img, side_px * EDGE_SCALE)
    rows = strip_rows(big.shape[2], strip_frac)
    return [whole, big[:, :, :rows], big[:, :, -rows:]]


def cell_targets(coverage: np.ndarray, shape_hw: tuple[int, int], strip_frac: float) -> list[torch.Tensor]:
    """Per view, 1 where a cell holds ink: ``coverage`` (at the strips' resolution, 0..1) max-pooled onto
    each view's 8 px cells; ``shape_hw`` is the whole view's pixel size."""
    ink = torch.from_numpy(coverage > 0.3).float()[None, None]
    out = [F.adaptive_max_pool2d(ink, (math.ceil(shape_hw[0] / 8), math.ceil(shape_hw[1] / 8)))[0, 0]]
    if strip_frac > 0:
        rows = strip_rows(ink.shape[2], strip_frac)
        cells = (math.ceil(rows / 8), math.ceil(ink.shape[3] / 8))
        out += [F.adaptive_max_pool2d(part, cells)[0, 0] for part in (ink[:, :, :rows], ink[:, :, -rows:])]
    return out


# ------------------------------------------------------------------------------------------- training


def bundled_photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB) of the clean photos that ship inside installed packages (no download, no shared folder)."""
    import matplotlib.cbook
    import skimage.data

    photos = []
    for name in SKIMAGE_TRAIN_PHOTOS:
        arr = getattr(skimage.data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        photos.append((f"skimage:{name}", Image.fromarray(arr).convert("RGB")))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(("matplotlib:grace_hopper", Image.open(f).convert("RGB")))
    return photos


def folder_photos(folders: list[Path], max_pixels: int = 8192 * 8192) -> list[tuple[str, Image.Image]]:
    """(path, RGB) of every JPEG/PNG under ``folders``, sorted (the order is part of the seed's result)."""
    from stagewise.images import ImageError, load_rgb

    photos = []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"clean photo folder not found: {folder}")
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
            try:
                img = load_rgb(path, max_pixels)
            except ImageError as exc:
                log.warning("skipped %s: %s", path, exc)
                continue
            img.thumbnail((1024, 1024))  # training crops are 384 px: no need to hold 4K photos
            photos.append((str(path), img))
    return photos


def training_crop(rng: np.random.Generator, photo: Image.Image) -> Image.Image:
    """A random 4:3 crop (40-100 % of the largest one), maybe mirrored, at EDGE_SCALE x TRAIN_SHAPE_PX (the
    marks are drawn at the strips' resolution; the whole view is shrunk from it as the stage shrinks photos)."""
    tw, th = TRAIN_SHAPE_PX[0] * EDGE_SCALE, TRAIN_SHAPE_PX[1] * EDGE_SCALE
    w, h = photo.size
    base = min(w / tw, h / th)
    scale = base * math.sqrt(rng.uniform(0.4, 1.0))
    cw, ch = max(8, int(tw * scale)), max(8, int(th * scale))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch)).resize((tw, th), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


@dataclass
class Synthetic:
    images: list[Image.Image]
    feats: list[torch.Tensor]  # per view (N, 152, h, w) backbone features, float16 to halve memory
    targets: list[torch.Tensor]  # per view (N, h, w) 1 where a cell holds ink
    labels: torch.Tensor  # (N,) 1 = marked
    kinds: list[str]


def synthesize_set(rng: np.random.Generator, photos: list[Image.Image], n: int, clean_fraction: float, desc: str,
                   strip_frac: float, keep_images: bool, workers: int = 2) -> Synthetic:
    """``n`` synthetic images drawn in order from ``rng`` (so the set depends on the seed only), their
    backbone features per view computed in ``workers`` threads (one torch thread each: the result of one
    image does not depend on how many run at once). The images themselves are kept only with
    ``keep_images`` (the calibration set's text scores need them; 1024 training images would hold 1.4 GB)."""
    from concurrent.futures import ThreadPoolExecutor

    backbone = load_backbone()

    def features(img: Image.Image) -> list[torch.Tensor]:
        with torch.no_grad():
            return [backbone.features(view)[0].half() for view in views(img, max(TRAIN_SHAPE_PX), strip_frac)]

    images, targets, labels, kinds, feats = [], [], [], [], []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=n, desc=desc, unit="img", mininterval=1.0) as bar:
        pending = []
        for _ in range(n):
            kind = None if rng.random() < clean_fraction else marks.random_kind(rng)
            img, coverage = marks.synthesize(rng, training_crop(rng, photos[rng.integers(len(photos))]), kind)
            pending.append(pool.submit(features, img))
            targets.append(cell_targets(coverage, (TRAIN_SHAPE_PX[1], TRAIN_SHAPE_PX[0]), strip_frac))
            if keep_images:
                images.append(img)
            labels.append(float(kind is not None))
            kinds.append(kind or "clean")
        for future in pending:
            feats.append(future.result())
            bar.update(1)
    by_view = lambda items: [torch.stack(view) for view in zip(*items)]  # noqa: E731
    return Synthetic(images, by_view(feats), by_view(targets), torch.tensor(labels), kinds)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-regularised logistic regression by Newton's method (a few features),
    monotone: a feature whose weight comes out negative is dropped and the rest refitted, since more
    evidence of a mark must never lower P(watermark) (with ~100 calibration images, correlated signals
    otherwise trade signs and one of them ends up penalised)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    active = np.ones(x.shape[1], dtype=bool)
    while True:
        z = np.hstack([((x - mean) / std)[:, active], np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        for _ in range(iters):
            p = 1 / (1 + np.exp(-np.clip(z @ w, -60, 60)))
            grad = z.T @ (p - y) + l2 * np.r_[w[:-1], 0]
            hess = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
            w -= np.linalg.solve(hess, grad)
        if (w[:-1] >= 0).all() or active.sum() == 1:
            break
        active[np.flatnonzero(active)[np.argmin(w[:-1])]] = False
    full = np.zeros(x.shape[1])
    full[active] = np.maximum(w[:-1], 0)
    # Back to raw feature units, so the stored model is plain: p = sigmoid(x . coef + bias).
    coef = full / std
    return coef, float(w[-1] - (coef * mean).sum())


def text_feature(score: float) -> float:
    """The text detector's score on a log scale: most clean photos score 0 and marks 0.001-0.5."""
    return math.log10(score + 1e-3)


def combiner_inputs(head_score: float, head_edge_score: float, head_lit_frac: float, text_score: float, text_edge_score: float) -> np.ndarray:
    return np.array([head_score, head_edge_score, head_lit_frac, text_feature(text_score), text_feature(text_edge_score)], dtype=np.float64)


def train(cfg: HeadTrainConfig, text_score, photos: list[tuple[str, Image.Image]] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the head from ``cfg.seed`` and fit the combiner. ``text_score(img) -> (score, edge score)`` is
    the text detector as the watermark stage runs it; ``photos`` are (name or path, RGB) clean backgrounds
    (default the bundled ones). Returns (head state dict, meta). Same seed, same weights."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical on any machine; the backbone runs in two threads instead
    try:
        return _train(cfg, text_score, photos, start)
    finally:
        torch.set_num_threads(threads)


def calibration_split(photos: list[tuple[str, Image.Image]]) -> tuple[list[Image.Image], list[Image.Image]]:
    """(training, calibration) photos, split by folder: every CALIBRATION_EVERY-th folder (a bundled photo
    is a folder of its own) is kept for calibration. Split by folder, not photo: photos of one subject or
    package look alike, and a head calibrated on its own subjects sets a threshold new ones exceed."""
    group = lambda name: str(Path(name).parent) if "/" in name or "\\" in name else name  # noqa: E731
    groups = sorted({group(name) for name, _ in photos})
    held = set(groups[::CALIBRATION_EVERY]) if len(groups) >= CALIBRATION_EVERY else set()
    train_photos = [img for name, img in photos if group(name) not in held]
    cal_photos = [img for name, img in photos if group(name) in held]
    return (train_photos, cal_photos) if held else ([img for _, img in photos], [img for _, img in photos])


def _train(cfg: HeadTrainConfig, text_score, photos: list[tuple[str, Image.Image]] | None, start: float) -> tuple[dict[str, torch.Tensor], dict]:
    photos = photos if photos is not None else bundled_photos()
    # Photos split, not crops: the combiner and its threshold are fitted on photos the head never saw, or
    # the head's confidence on its own training photos sets a threshold real photos exceed.
    train_photos, cal_photos = calibration_split(photos)
    rng = np.random.default_rng(cfg.seed)
    data = synthesize_set(rng, train_photos, cfg.train_images, cfg.clean_fraction, "head training marks", cfg.edge_strip_frac, keep_images=False)
    # Seeded right here: the backbone's first build (in synthesize_set) draws from torch's global RNG for
    # its layers' initial weights, so a seed set earlier gave a different head in a process's first run.
    torch.manual_seed(cfg.seed)
    head = MaskHead(cfg.hidden_channels)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    pos_weight = torch.tensor(cfg.pos_weight)
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(data.labels), (cfg.batch_size,), generator=order)
        logits = [head(feats[idx].float()) for feats in data.feats]
        score, _ = image_scores(logits, cfg.top_k)
        mask_loss = sum(F.binary_cross_entropy_with_logits(view, targets[idx], pos_weight=pos_weight) for view, targets in zip(logits, data.targets))
        loss = mask_loss / len(logits) + 0.5 * F.binary_cross_entropy_with_logits(score, data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay: the last steps settle instead of jumping
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / cfg.steps))
        losses.append(float(loss.detach()))
    head.eval()

    cal = synthesize_set(rng, cal_photos, cfg.calibration_images, cfg.clean_fraction, "head calibration marks", cfg.edge_strip_frac, keep_images=True)
    with torch.no_grad():
        s, edge, lit = view_scores([head(feats.float()) for feats in cal.feats], cfg.top_k)
    text = [text_score(img) for img in tqdm(cal.images, desc="head calibration text scores", unit="img", mininterval=1.0)]
    x = np.stack([combiner_inputs(float(a), float(e), float(b), *t) for a, e, b, t in zip(s, edge, lit, text)])
    y = cal.labels.numpy().astype(np.float64)
    coef, bias = fit_logistic(x, y)
    p = 1 / (1 + np.exp(-(x @ coef + bias)))
    clean_p = np.sort(p[y == 0])
    # The lowest threshold with calibration_keep of the clean images at or below it (never under 0.5).
    threshold = float(max(0.5, clean_p[min(len(clean_p) - 1, math.ceil(cfg.calibration_keep * len(clean_p)) - 1)])) if len(clean_p) else 0.5
    recall = float((p[y == 1] > threshold).mean()) if (y == 1).any() else math.nan
    meta = {
        "version": HEAD_VERSION,
        "config": cfg.model_dump(),
        "backbone": {"name": "efficientnet-lite0", "weights_sha256": sha256_file(weights_path())},
        "combiner": {"features": list(COMBINER_FEATURES), "coef": [float(c) for c in coef], "bias": bias},
        "threshold": threshold,
        "calibration": {"images": len(y), "clean": int((y == 0).sum()), "clean_kept": float((clean_p <= threshold).mean()) if len(clean_p) else math.nan,
                        "recall": recall},
        "train_loss_last": float(np.mean(losses[-20:])),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}, meta


# ------------------------------------------------------------------------------------------ files


def save(folder: Path | str, state: dict[str, torch.Tensor], meta: dict) -> None:
    """head.safetensors, then head.json holding the weights file's sha256 (written last: a killed save
    leaves a json that does not match, which load() reports)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / HEAD_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(folder / META_FILE, {**meta, "weights_sha256": sha256_file(folder / HEAD_FILE)})


class HeadError(FileNotFoundError):
    """A missing or unusable head file; the message names the path."""


@dataclass
class LoadedHead:
    head: MaskHead
    meta: dict
    folder: Path
    model_hash: str  # what the stage's memo is keyed by: weights + meta

    @property
    def top_k(self) -> int:
        return int(self.meta["config"]["top_k"])

    @property
    def side_px(self) -> int:
        return int(self.meta["config"]["input_side_px"])

    def probability(self, head_score: float, head_edge_score: float, head_lit_frac: float, text_score: float, text_edge_score: float) -> float:
        c = self.meta["combiner"]
        z = float(combiner_inputs(head_score, head_edge_score, head_lit_frac, text_score, text_edge_score) @ np.asarray(c["coef"])) + float(c["bias"])
        return 1 / (1 + math.exp(-max(min(z, 60.0), -60.0)))

    def score_image(self, img: Image.Image) -> dict[str, float]:
        """The head's whole-view and strip scores and lit share for one image (the per-image work the stage memoises)."""
        backbone, strip_frac = load_backbone(), float(self.meta["config"]["edge_strip_frac"])
        with torch.no_grad():
            s, edge, lit = view_scores([self.head(backbone.features(view)) for view in views(img, self.side_px, strip_frac)], self.top_k)
        return {"head_score": round(float(s[0]), 5), "head_edge_score": round(float(edge[0]), 5), "head_lit_frac": round(float(lit[0]), 5)}


def save_disabled(folder: Path | str) -> None:
    """The head folder of ``enabled: false``: a head.json saying so, and no weights (an old file is removed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEAD_FILE).unlink(missing_ok=True)
    write_json(folder / META_FILE, {"version": HEAD_VERSION, "enabled": False})


def load(folder: Path | str) -> LoadedHead | None:
    """The head in ``folder`` (head.safetensors + head.json), checked; None when it was made with
    ``enabled: false``; a clear error naming the path otherwise."""
    folder = Path(folder)
    weights, meta_path = folder / HEAD_FILE, folder / META_FILE
    how = "train it with `dvc repro watermark_head`, or set watermark_head.enabled: false to use the text detector alone"
    if not meta_path.is_file():
        raise HeadError(f"watermark head not found: {meta_path} ({how})")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if meta.get("enabled") is False and meta.get("version") == HEAD_VERSION:
            return None
        if not weights.is_file():
            raise HeadError(f"watermark head not found: {weights} ({how})")
        if meta.get("version") != HEAD_VERSION:
            raise ValueError(f"head version {meta.get('version')!r}, this code reads version {HEAD_VERSION}")
        cfg = HeadTrainConfig(**meta["config"])
        if len(meta["combiner"]["coef"]) != len(COMBINER_FEATURES):
            raise ValueError("combiner has the wrong number of features")
        float(meta["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HeadError(f"watermark head metadata unreadable: {meta_path}: {exc} ({how})") from None
    actual = sha256_file(weights)
    if meta.get("weights_sha256") != actual:
        raise HeadError(f"watermark head weights do not match their metadata: {weights} has sha256 {actual[:12]}, "
                        f"{meta_path} expects {str(meta.get('weights_sha256'))[:12]} (a partial or replaced file; {how})")
    head = MaskHead(cfg.hidden_channels)
    try:
        head.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as exc:  # safetensors raises its own error types on a corrupt header
        raise HeadError(f"watermark head weights unreadable: {weights}: {exc} ({how})") from None
    head.eval().requires_grad_(False)
    return LoadedHead(head, meta, folder, fingerprint("watermark-head", actual, meta))
