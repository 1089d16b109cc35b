"""Apply a trained stage to new photos or a video: every face swapped to the other domain and blended back.

Reads params.yaml `swap` (input, direction, blend), `align` (how faces are found and cropped: as in
training) and `codec`. Writes --out/frames/ (one PNG per input image, or <input>.mp4 at the input's frame
rate with its audio), --out/sheet.png (before | after), --out/swaps.parquet (one row per frame: swapped,
unchanged with the reason, or unreadable) and --metrics. Detections and model outputs are memoised in
--store, so a changed blend param (erode_px, blur_px, color_transfer) reruns only the blend.
Swap your own video: `dvc exp run -S swap.input=/path/to/video.mp4`.
"""

import argparse
import logging
import shutil
from pathlib import Path

import pandas as pd

from stagewise import cli
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import ParamsError, load_section
from stagewise.device import pick_device
from stagewise.faces.extract import AlignConfig
from stagewise.faces.swap import SwapConfig, Swapper, sheet_image, swap
from stagewise.faces.video import VideoError
from stagewise.io import sha256_file, write_bytes, write_json, write_parquet
from stagewise.train.checkpoint import load_model

log = logging.getLogger("stages.swap")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("swap", SwapConfig, args.params)
    align_cfg = load_section("align", AlignConfig, args.params)
    codec_cfg = load_section("codec", CodecConfig, args.params)
    source = Path(cfg.input)
    if not source.exists():
        raise ParamsError(f"{args.params}: swap.input: {source} does not exist (a folder of photos or a video file)")
    device = pick_device(cfg.device)
    try:
        model, meta = load_model(Path(args.model), device)
    except FileNotFoundError as exc:
        raise cli.StageError(f"{exc} (params.yaml swap.stage names the training stage to apply)") from None
    codec = load_codec(codec_cfg, device)
    if meta.get("codec_id") != codec.id:
        raise cli.StageError(f"{args.model}: trained with codec {meta.get('codec_id')}, params.yaml codec gives {codec.id}")
    out = Path(args.out)
    shutil.rmtree(out / "frames", ignore_errors=True)  # this stage's own output, rewritten whole
    (out / "frames").mkdir(parents=True, exist_ok=True)
    swapper = Swapper(cfg, align_cfg, model, sha256_file(Path(args.model) / "model.safetensors"), codec, Path(args.store), device)
    try:
        result = swap(source, out, swapper)
    except VideoError as exc:
        raise cli.StageError(f"swap.input {source}: {exc}") from None
    import io

    buf = io.BytesIO()
    sheet_image(result.sheet, f"{meta.get('stage', args.model)}: {cfg.direction.replace('_', ' ')}").save(buf, format="PNG")
    write_bytes(out / "sheet.png", buf.getvalue())
    write_parquet(out / "swaps.parquet", pd.DataFrame(result.rows, columns=["input", "frame_index", "time_s", "status", "reason", "faces"]))
    write_json(args.metrics, result.metrics())
    log.info("%d frames: %d swapped (%d faces), %d unchanged (no usable face), %d unreadable; detector ran on %d, model on %d faces",
             result.frames, result.swapped_frames, result.faces_swapped, result.unchanged_frames, result.unreadable, result.detected_now, result.model_now)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.swap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the training stage's folder (runs/<stage>) with model.safetensors + meta.json")
    parser.add_argument("--out", required=True, help="output folder (swaps/<stage>)")
    parser.add_argument("--metrics", required=True, help="counts JSON (frames swapped, unchanged, unreadable)")
    parser.add_argument("--store", required=True, help="folder of memoised detections and model outputs (safe to delete)")
    cli.run(main, parser)
