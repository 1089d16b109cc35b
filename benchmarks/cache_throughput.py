"""Throughput of the cache stage's work next to the bare codec forward pass, measured in the same run.

For each resolution: images/s of `update_cache` into an empty folder (read file + sha256 check + decode +
centre crop + LANCZOS resize + encode + float16 bytes + Parquet shards, with decoding overlapping
encoding), and images/s of `codec.encode` alone on tensors already in memory, same batch size. The ratio
shows what I/O and decoding cost on top of the codec.

Images: ../shared/datasets/dreambooth when it exists (real photos of mixed sizes), else the embedded
sample built into a temporary folder; `--images DIR` picks a folder. Flips are off, so images = rows.

    .venv/bin/python benchmarks/cache_throughput.py                       # taef2 at 256 and 512 px
    .venv/bin/python benchmarks/cache_throughput.py --resolutions 128 --codec pixels
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stagewise.cache import CacheConfig, load_unit, make_units, update_cache, wanted_rows
from stagewise.codecs import CodecConfig, load_codec
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.device import pick_device

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT.parent / "shared" / "datasets" / "dreambooth"


def image_dataset(folder: Path | None, work: Path, limit: int):
    """The dataset frame the cache stage would read: kept images of ``folder`` with a caption."""
    if folder is None:
        if DREAMBOOTH.is_dir():
            folder = DREAMBOOTH
        else:
            from stagewise.sample import SampleConfig, build_sample

            folder = work / "sample"
            build_sample(folder, SampleConfig())
    manifest, _ = ingest({"a": folder}, IngestConfig(), work / "ingest-store")
    kept = manifest[manifest["status"] == "kept"].head(limit).reset_index(drop=True)
    return folder, kept.assign(caption="a photo")


def bare_encode_rate(codec, dataset, resolution: int, batch_size: int, device) -> float:
    """images/s of codec.encode on crops already decoded, resized and on the device."""
    units = make_units(wanted_rows(dataset, flip=False))
    crops = [load_unit(u, resolution)[0] for u in units]
    batches = [
        torch.from_numpy(np.stack(crops[i : i + batch_size])).to(device).permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        for i in range(0, len(crops), batch_size)
    ]
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        codec.encode(batch).cpu()  # .cpu(): the cache copies every latent back too
    sync(device)
    return len(crops) / (time.perf_counter() - start)


def cache_rate(codec, dataset, resolution: int, cfg: CacheConfig, device, out: Path) -> float:
    start = time.perf_counter()
    result = update_cache(dataset, out, resolution, codec, cfg, device)
    elapsed = time.perf_counter() - start
    assert result.images_encoded == len(dataset) and not result.failed, result.summary()
    return len(dataset) / elapsed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="taef2", choices=["taef2", "pixels"])
    parser.add_argument("--weights", default=None, help="TAEF2 weight folder (default: the usual search, see stagewise/codecs/taef2.py)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=CacheConfig().batch_size)
    parser.add_argument("--workers", type=int, default=CacheConfig().workers)
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: dreambooth if present, else the sample)")
    parser.add_argument("--limit", type=int, default=32, help="images to use; 32 keeps a 2-core CPU run at 512 px to about 30 s per figure")
    parser.add_argument("--repeat", type=int, default=2, help="measure each figure this many times (alternating) and keep the best: a shared machine only ever slows a run down")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = pick_device(args.device)
    codec = load_codec(CodecConfig(name=args.codec, weights=args.weights), device)
    cfg = CacheConfig(flip=False, batch_size=args.batch_size, workers=args.workers, device=args.device)
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        folder, dataset = image_dataset(args.images, Path(tmp), args.limit)
        sizes = dataset["width"].astype(str) + "x" + dataset["height"].astype(str)
        print(f"codec {codec.id} on {device} ({torch.get_num_threads()} threads, {os.cpu_count()} cpus); batch {args.batch_size}, "
              f"{args.workers} decode workers; {len(dataset)} images from {folder} (e.g. {', '.join(sizes.head(3))} px)")  # fmt: skip
        warm = torch.rand(args.batch_size, 3, min(args.resolutions), min(args.resolutions), device=device)
        codec.encode(warm)  # first-call allocations belong to neither figure
        print(f"{'px':>5} {'cache stage img/s':>18} {'bare encode img/s':>18} {'cache / bare':>13}")
        for res in args.resolutions:
            bare = stage = 0.0
            for attempt in range(args.repeat):
                bare = max(bare, bare_encode_rate(codec, dataset, res, args.batch_size, device))
                stage = max(stage, cache_rate(codec, dataset, res, cfg, device, Path(tmp) / f"cache-{res}-{attempt}"))
            print(f"{res:>5} {stage:>18.2f} {bare:>18.2f} {stage / bare:>13.2f}")


if __name__ == "__main__":
    main()
