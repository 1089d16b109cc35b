"""Throughput of the faces stages on this machine: extract (align) images/s and swap frames/s, each next to
its bare model in the same run.

- extract: ``stagewise.faces.extract.extract`` on N photos (the embedded sample's clean crops: real faces
  at 512 px; crops written at --crop-px, memo store empty), against the bare detector + face mesh
  (``FaceFinder.detect`` + ``landmarks``) on the same decoded images in one thread: the difference is
  decoding, alignment, masks, PNG writes and the memo store.
- swap: ``stagewise.faces.swap`` on the same photos with a random model at --model-px (stores empty, so
  detection and the model run), against the bare model forward (codec encode -> autoencoder with B's
  decoder -> codec decode) on the same number of crops; then the same swap again with another blend
  (everything memoised: the blend alone).

Process start-up and graph builds (mediapipe ~1 s, TAEF2 load) are paid once before timing. The codec is
TAEF2 when its weights are found (``STAGEWISE_MODELS``), else pixels.

    .venv/bin/python benchmarks/faces_throughput.py                  # 24 photos, 128 px model
    .venv/bin/python benchmarks/faces_throughput.py --images 48 --model-px 256 --device cuda
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="photos to extract and swap (the sample's clean crops, repeated with new seeds)")
    parser.add_argument("--crop-px", type=int, default=512, help="align.crop_px")
    parser.add_argument("--model-px", type=int, default=128, help="the swap model's resolution")
    parser.add_argument("--codec", default=None, help="taef2 or pixels (default: taef2 when its weights are found)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from stagewise.codecs import CodecConfig, load_codec
    from stagewise.faces.detect import finder
    from stagewise.faces.extract import AlignConfig, extract
    from stagewise.faces.swap import SwapConfig, Swapper, swap
    from stagewise.images import load_rgb
    from stagewise.models.autoencoder import ModelConfig, init_model
    from stagewise.sample import SampleConfig, build_sample

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    codec_name = args.codec or ("taef2" if os.environ.get("STAGEWISE_MODELS") and Path(os.environ["STAGEWISE_MODELS"], "taef2").is_dir() else "pixels")
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="faces-bench-"))
    photos: list[Path] = []
    seed = 0
    while len(photos) < args.images:
        build_sample(work / f"sample{seed}", SampleConfig(seed=seed, crops_per_domain=max(6, args.images // 2)))
        photos += sorted((work / f"sample{seed}").glob("[ab]/[ab]_[0-9][0-9][0-9].jpg"))
        seed += 1
    photos = photos[: args.images]
    folder = work / "photos"
    folder.mkdir()
    for i, p in enumerate(photos):
        (folder / f"{i:04d}.jpg").write_bytes(p.read_bytes())
    photos = sorted(folder.glob("*.jpg"))
    import hashlib

    manifest = pd.DataFrame({"path": [str(p) for p in photos], "domain": "a", "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos],
                             "status": "kept", "format": "JPEG"})
    images = [np.asarray(load_rgb(p, 2**31)) for p in photos]
    found = finder()
    found.landmarks(images[0], found.detect(images[0])[0])  # build the graphs before timing

    t = time.perf_counter()
    for img in images:
        for det in found.detect(img)[:1]:
            found.landmarks(img, det)
    bare_detect = time.perf_counter() - t
    cfg = AlignConfig(enabled=True, crop_px=args.crop_px, workers=1)
    t = time.perf_counter()
    faces, computed = extract(manifest, cfg, work / "faces", work / "store/align")
    extract_s = time.perf_counter() - t
    cfg2 = cfg.model_copy(update={"workers": 2})
    t = time.perf_counter()
    extract(manifest, cfg2.model_copy(update={"max_yaw": 0.51}), work / "faces2", work / "store/align2")  # a new fingerprint: all computed again
    extract2_s = time.perf_counter() - t
    kept = int((faces["status"] == "kept").sum())

    codec = load_codec(CodecConfig(name=codec_name), device)
    model_cfg = ModelConfig(resolution_px=args.model_px)
    model = init_model(model_cfg, codec.channels, codec.factor).to(device).eval()
    crops = torch.rand(len(images), 3, args.model_px, args.model_px, device=device)
    with torch.no_grad():
        codec.decode(model.decode(model.encode(codec.encode(crops[:1])), "b"))  # warm-up
        t = time.perf_counter()
        for start in range(0, len(images), 8):
            x = codec.normalize(codec.encode(crops[start : start + 8]))
            codec.decode(codec.denormalize(model.decode(model.encode(x), "b")))
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare_model = time.perf_counter() - t

    swap_cfg = SwapConfig(input=str(folder), stage="bench", device=args.device)
    swapper = Swapper(swap_cfg, cfg, model, "bench", codec, work / "store/swap", device)
    t = time.perf_counter()
    result = swap(folder, work / "swaps", swapper)
    swap_s = time.perf_counter() - t
    swapper.cfg = swap_cfg.model_copy(update={"color_transfer": "lct", "blur_px": 4})
    t = time.perf_counter()
    again = swap(folder, work / "swaps", swapper)
    blend_s = time.perf_counter() - t

    n = len(images)
    print(f"faces throughput: {n} photos at 512 px, crops {args.crop_px} px, model {args.model_px} px, codec {codec_name}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"  {kept} faces kept of {n} photos; load average {os.getloadavg()[0]:.1f}")
    print(f"  bare detector + mesh, 1 thread     {n / bare_detect:7.2f} images/s")
    print(f"  extract (align stage), 1 worker    {n / extract_s:7.2f} images/s   ({bare_detect / extract_s:.0%} of bare)")
    print(f"  extract (align stage), 2 workers   {n / extract2_s:7.2f} images/s   ({bare_detect / extract2_s:.0%} of bare)")
    print(f"  bare model forward (codec+AE+codec) {n / bare_model:7.2f} crops/s")
    print(f"  swap, stores empty                 {n / swap_s:7.2f} frames/s   ({result.faces_swapped} faces; detection {result.detected_now}, model {result.model_now})")
    print(f"  swap again, new blend (memoised)   {n / blend_s:7.2f} frames/s   (detection {again.detected_now}, model {again.model_now})")


if __name__ == "__main__":
    main()
