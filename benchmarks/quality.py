"""Quality benchmark: held-out reconstruction after a short fixed recipe, the figure trainer changes are judged by.

Two subjects of the DreamBooth photos (``../shared/datasets/dreambooth``) are the two domains. Each photo
gives ``--crops`` square crops (the full centre square and off-centre ones); ``--holdout-photos`` photos
per domain are held out *whole* (every crop of them), so held-out images are views the model never saw,
not other crops of a training photo. Both sets go through the real cache (``update_cache``, with flips)
and the training stages through the real loop (``StageTrainer``) with this recipe:

    s128 (--kimg-128)  ->  s256_locked (grow, freeze [old], fade-in)  ->  s256 (everything trains)

The model and codec come from ``--params`` (params.yaml: ``model``, ``codec``, ``train.defaults`` for batch
size, warp and loss); the stage lengths and learning rate come from this script, so the recipe is fixed.

Printed per domain, on the held-out images at 256 px:

    model vs latent   PSNR / SSIM of the decoded reconstruction against the decoded cached latent
                      (what metrics.json reports: the model's error alone)
    model vs photo    against the original pixels (what a user sees: model and codec errors together)
    codec ceiling     encode -> decode of the same images against the original pixels: no model beats it

and the training throughput (images/s over the three stages, both domains counted).

Augmentation on a latent codec, two ways (the README's table compares them):

    (b) default: the loop resamples the latent grid, one affine for input and target (augment.py)
    (a) --variants K: K affine variants of every training crop made in pixel space *before* encoding
        (each one a training image of its own, through the real cache), and the loop's latent affine
        off (warp.affine false); the smooth warp stays on the input's latent. Encoding costs K + 1 times.

    python benchmarks/quality.py [--subjects dog2 dog3] [--kimg-128 1.5] [--kimg-256 1.0] [--lr 0.001] [--variants 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stagewise.cache import CacheConfig, update_cache  # noqa: E402
from stagewise.codecs import CodecConfig, load_codec  # noqa: E402
from stagewise.config import load_section, read_params  # noqa: E402
from stagewise.images import center_square  # noqa: E402
from stagewise.latents import from_rows, read_latents  # noqa: E402
from stagewise.models import DOMAINS, ModelConfig, init_model  # noqa: E402
from stagewise.train import checkpoint as ckpt  # noqa: E402
from stagewise.train.loop import StageJob, run_stage  # noqa: E402
from stagewise.train.metrics import _uint8, pixel_scores  # noqa: E402
from stagewise.train.preview import to_pixels  # noqa: E402
from stagewise.train.augment import draw  # noqa: E402
from stagewise.train.recipe import parse_train  # noqa: E402
from stagewise.train.warp import WarpConfig  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets" / "dreambooth"
SIZES = (128, 256)


def crops(photo: Image.Image, count: int, size_px: int) -> list[Image.Image]:
    """The centre square, then squares of 80 % of the short side at the corners and edges, in a fixed order."""
    width, height = photo.size
    side = min(width, height)
    out = [center_square(photo, size_px)]
    small = int(side * 0.8)
    spots = [(0, 0), (1, 1), (0, 1), (1, 0), (0.5, 0), (0.5, 1), (0, 0.5), (1, 0.5)]
    for fx, fy in spots[: count - 1]:
        left, top = int((width - small) * fx), int((height - small) * fy)
        out.append(photo.crop((left, top, left + small, top + small)).resize((size_px, size_px), Image.LANCZOS))
    return out


def write_images(datasets: Path, subjects: list[str], crops_per_photo: int, holdout_photos: int, folder: Path) -> dict[str, pd.DataFrame]:
    """PNG crops of every photo; returns the dataset frames (path, domain, sha256, caption) for train and heldout."""
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    for domain, subject in zip(DOMAINS, subjects):
        photos = sorted((datasets / subject).glob("*.jpg"))
        if len(photos) <= holdout_photos:
            raise SystemExit(f"{datasets / subject}: {len(photos)} photos; --holdout-photos {holdout_photos} leaves none to train on")
        for index, path in enumerate(photos):
            split = "heldout" if index < holdout_photos else "train"
            photo = Image.open(path).convert("RGB")
            for k, crop in enumerate(crops(photo, crops_per_photo, max(SIZES))):
                out = folder / split / domain / f"{path.stem}-{k}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                crop.save(out)
                rows[split].append({"path": str(out), "domain": domain, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "caption": subject})
    return {split: pd.DataFrame(r) for split, r in rows.items()}


def write_variants(train: pd.DataFrame, count: int, warp: WarpConfig, folder: Path) -> pd.DataFrame:
    """``count`` pixel-space affine variants (the warp's rotation / scale / translation ranges) of every
    training crop, as PNGs; returns their dataset rows (same domain and caption as the crop)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for record in train.itertuples():
        photo = torch.from_numpy(np.array(Image.open(record.path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
        for k in range(count):
            target_grid, _ = draw(1, gen, warp.model_copy(update={"affine": True}), False, photo.device).grids(*photo.shape[-2:])
            moved = F.grid_sample(photo, target_grid, mode="bilinear", padding_mode=warp.padding, align_corners=False)
            out = folder / record.domain / f"{Path(record.path).stem}-v{k}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((moved[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(out)
            rows.append({"path": str(out), "domain": record.domain, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "caption": record.caption})
    return pd.DataFrame(rows)


def photo_pixels(frame: pd.DataFrame, domain: str, size_px: int) -> torch.Tensor:
    """The original images of ``frame``'s rows of ``domain``, in the cache's sha256 order, as RGB [0, 1]."""
    rows = frame[frame["domain"] == domain].sort_values("sha256")
    arrays = [np.asarray(center_square(Image.open(p).convert("RGB"), size_px)) for p in rows["path"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def heldout_latents(cache: Path, codec, domain: str) -> torch.Tensor:
    frame = read_latents(cache)
    frame = frame[(frame["domain"] == domain) & ~frame["flipped"]].sort_values("sha256")
    return codec.normalize(from_rows(frame).float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="model, codec and train.defaults come from here")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="the DreamBooth folder (default: %(default)s)")
    parser.add_argument("--subjects", nargs=2, default=["dog2", "dog3"], help="DreamBooth subject folders for domains a and b")
    parser.add_argument("--crops", type=int, default=4, help="crops per photo (default: %(default)s)")
    parser.add_argument("--holdout-photos", type=int, default=2, help="photos per domain held out with all their crops (default: %(default)s)")
    parser.add_argument("--kimg-128", type=float, default=1.5, help="length of s128 (default: %(default)s)")
    parser.add_argument("--kimg-256", type=float, default=1.0, help="length of s256_locked + s256 together, split 1:1 (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.001, help="every stage's learning rate (default: %(default)s, the demo's)")
    parser.add_argument("--variants", type=int, default=0, help="(a): pixel-space affine variants per training crop, encoded into the cache; 0: the loop's latent affine (b) (default: %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="extra train.defaults, e.g. random_warp=false")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".stagewise" / "quality", help="crops and their latent caches, reused by the next run (git-ignored; default: %(default)s)")
    parser.add_argument("--keep", help="keep the training runs here instead of a temp dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.datasets.is_dir():
        raise SystemExit(f"{args.datasets}: not found (the DreamBooth photos live beside the checkout, in ../shared)")
    torch.manual_seed(0)
    model_cfg = load_section("model", ModelConfig, args.params).model_copy(update={"resolution_px": SIZES[0]})
    codec_cfg = load_section("codec", CodecConfig, args.params)
    codec = load_codec(codec_cfg)
    cache_cfg = load_section("cache", CacheConfig, args.params).model_copy(update={"workers": 2})
    defaults = dict(read_params(args.params).get("train", {}).get("defaults") or {})
    defaults.update(holdout_per_domain=0, preview_rows=1, log_every_kimg=0.25, save_every_kimg=100, lr=args.lr)
    if args.variants:  # the affine is in the variants' pixels: the loop keeps only the smooth warp on the input
        defaults["warp"] = {**(defaults.get("warp") or {}), "affine": False}
    defaults.update({k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)})
    half = args.kimg_256 / 2
    recipe = {
        "s128": {"parent": "init", "resolution_px": 128, "length_kimg": args.kimg_128},
        "s256_locked": {"parent": "s128", "resolution_px": 256, "length_kimg": half, "freeze": ["old"], "fade_in_kimg": half / 2},
        "s256": {"parent": "s256_locked", "resolution_px": 256, "length_kimg": half},
    }
    train = parse_train({"defaults": defaults, "stages": recipe})

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        clock = time.perf_counter()
        store = args.cache_dir / f"{'-'.join(args.subjects)}-{args.crops}x-{args.holdout_photos}"
        frames = write_images(args.datasets, args.subjects, args.crops, args.holdout_photos, store / "images")
        caches = {split: store / "cache" / split for split in frames}
        if args.variants:
            warp = parse_train({"defaults": defaults, "stages": recipe}).stages["s128"].warp
            variants = write_variants(frames["train"], args.variants, warp, store / "images" / f"variants-{args.variants}")
            frames["train"] = pd.concat([frames["train"], variants], ignore_index=True)
            caches["train"] = store / "cache" / f"train-variants-{args.variants}"
        for split, frame in frames.items():  # incremental: a second run encodes nothing
            for px in SIZES:
                update_cache(frame, caches[split] / str(px), px, codec, cache_cfg if split == "train" else cache_cfg.model_copy(update={"flip": False}))
        print(f"cache: {sum(len(f) for f in frames.values())} images at {SIZES} px in {time.perf_counter() - clock:.0f} s", file=sys.stderr, flush=True)
        init = init_model(model_cfg, codec.channels, codec.factor)
        ckpt.save_model(work / "runs" / "init", init, {"stage": "init", "codec_id": codec.id, "config": {}})
        params_m = sum(p.numel() for p in init.parameters()) / 1e6
        images = seconds = 0.0
        for name, stage in train.stages.items():
            half_cache = caches["train"] / str(stage.resolution_px // 2)
            job = StageJob(name, train, codec_cfg, work / "runs" / stage.parent, caches["train"] / str(stage.resolution_px), work / "runs" / name, work / "runs" / name / "backups", progress=False, parent_cache_dir=half_cache if half_cache.is_dir() else None)
            start = time.perf_counter()
            metrics = run_stage(job)
            seconds += time.perf_counter() - start
            images += metrics["images_seen"]
            print(f"{name}: {metrics['images_seen']} images in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        model, _ = ckpt.load_model(work / "runs" / "s256")
        model.eval()
        top = SIZES[-1]
        n_train = (frames["train"]["domain"] == "a").sum()
        print(f"subjects a={args.subjects[0]} b={args.subjects[1]}; {n_train} training images per domain (+ mirrors), "
              f"{(frames['heldout']['domain'] == 'a').sum()} held out ({args.holdout_photos} photos x {args.crops} crops); codec {codec.id}; "
              f"model {params_m:.2f} M params at 128 px; recipe s128 {args.kimg_128:g} kimg -> s256_locked {half:g} -> s256 {half:g}, lr {args.lr:g}"
              + (f"; {args.variants} pixel-space variants per crop (a)" if args.variants else "; latent affine (b)")
              + (f"; set {' '.join(args.set)}" if args.set else ""))
        print(f"{'domain':6} {'images':>6} {'model vs latent':>18} {'model vs photo':>18} {'codec ceiling':>18}")
        totals = []
        for domain in DOMAINS:
            x = heldout_latents(store / "cache" / "heldout" / str(top), codec, domain)
            photos = photo_pixels(frames["heldout"], domain, top)
            with torch.no_grad():
                pred = torch.cat([model(chunk, domain) for chunk in x.split(8)])
            pred_px, latent_px, photo_px = _uint8(to_pixels(codec, pred)), _uint8(to_pixels(codec, x)), _uint8(photos)
            vs_latent, vs_photo, ceiling = pixel_scores(pred_px, latent_px), pixel_scores(pred_px, photo_px), pixel_scores(latent_px, photo_px)
            totals.append((vs_latent, vs_photo, ceiling))
            cell = lambda s: f"{s[0]:7.2f} dB / {s[1]:.3f}"  # noqa: E731
            print(f"{domain:6} {len(x):>6} {cell(vs_latent):>18} {cell(vs_photo):>18} {cell(ceiling):>18}")
        mean = [tuple(np.mean([t[i][j] for t in totals]) for j in range(2)) for i in range(3)]
        print(f"{'mean':6} {'':>6} " + " ".join(f"{f'{m[0]:7.2f} dB / {m[1]:.3f}':>18}" for m in mean))
        print(f"training: {images / 1000:g} kimg in {seconds:.0f} s = {images / seconds:.1f} images/s (both domains; torch threads {torch.get_num_threads()}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
