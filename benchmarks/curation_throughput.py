"""Throughput of the curation chain, and what a rerun costs after adding 1 % new images.

Runs the library calls behind the DVC stages, in order, on a few hundred images: `ingest` (stat, sha256,
decode probe), `watermark` (rapidocr's text detector), `vlm_filter` (a tiny random BLIP-VQA model asking
the two default questions) and `caption` (a tiny random BLIP captioner; sidecars still win), each with
its outputs written as the stage writes them. Every stage runs at `workers` 1 and 2 in the same run,
each time with empty result stores, alternating, best of --repeat (a shared machine only ever slows a
run down). For the model stages the same images are also decoded, preprocessed and run through the
model one batch after the other in one thread: the stage against that serial baseline shows what
overlapping decoding with the model buys. Then, on the 2-worker stores, 1 % new images are added to one
domain folder and the whole chain runs again: its time relative to the full run is the incremental
cost (target: under 5 %). Process start-up (importing torch and transformers, ~5-10 s here) is not in
either figure: a stage pays it once per run, whatever the number of images.

Images: the embedded sample (48 crops + its deliberate defects), ../shared/datasets/dreambooth when it
exists (117 photos at 640 px), then `stagewise.faults.make_good` photos at 512 px up to --images.
The tiny models are those the tests build (tests/tiny_models.py): the model figures measure the
pipeline around a model (decode, batching, overlap, memo, Parquet), not a real VLM's speed.

    .venv/bin/python benchmarks/curation_throughput.py                # 400 images
    .venv/bin/python benchmarks/curation_throughput.py --images 1000 --torch-threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; the bars would bury the table
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the same tiny model builders the tests use

from stagewise.curation.caption import CaptionConfig, caption_dataset, finish_captions, make_captioner  # noqa: E402
from stagewise.curation.ingest import IngestConfig, ingest, scan  # noqa: E402
from stagewise.curation.vlm import VlmConfig, filter_images  # noqa: E402
from stagewise.curation.watermark import WatermarkConfig, score_images  # noqa: E402
from stagewise.faults import make_good  # noqa: E402
from stagewise.io import write_parquet  # noqa: E402
from stagewise.sample import SampleConfig, build_sample  # noqa: E402

DREAMBOOTH = ROOT.parent / "shared" / "datasets" / "dreambooth"
STAGES = ["ingest", "watermark", "vlm_filter", "caption"]


def build_images(work: Path, total: int, dreambooth: Path | None) -> dict[str, Path]:
    """Domain folders holding about ``total`` candidate files (the user's folders are only read)."""
    build_sample(work / "sample", SampleConfig())
    domains = {"a": work / "sample" / "a", "b": work / "sample" / "b"}
    if dreambooth is not None and dreambooth.is_dir():
        domains["dreambooth"] = dreambooth
    have = sum(1 for _ in scan(domains))
    domains["pad"] = work / "pad"
    make_good(work / "pad", max(total - have, 1), seed=1, size_px=512)
    return domains


class Chain:
    """The four stages' library calls, each writing its outputs as the stage does. ``stores`` holds the
    result stores and outputs; a stage run against stores that already hold results is a rerun."""

    def __init__(self, domains: dict[str, Path], models: dict[str, Path]):
        self.domains, self.models = domains, models
        self.frames: dict[str, pd.DataFrame] = {}  # each stage's output, the next stage's input

    def ingest(self, stores: Path, workers: int) -> tuple[int, int]:
        out = stores / "curated" / "manifest.parquet"
        manifest, decoded = ingest(self.domains, IngestConfig(workers=workers), stores / "ingest", previous_manifest=out)
        write_parquet(out, manifest)
        self.frames["manifest"] = manifest
        return len(manifest), decoded

    def watermark(self, stores: Path, workers: int) -> tuple[int, int]:
        marks, detected = score_images(self.frames["manifest"], WatermarkConfig(workers=workers), stores / "watermark")
        write_parquet(stores / "curated" / "watermark.parquet", marks)
        self.frames["watermark"] = marks
        return len(marks), detected

    def vlm_filter(self, stores: Path, workers: int) -> tuple[int, int]:
        cfg = VlmConfig(model=str(self.models["vqa"]), workers=workers, batch_size=8)  # the two default questions
        answers, asked = filter_images(self.frames["manifest"], cfg, stores / "vlm_filter")
        write_parquet(stores / "curated" / "vlm_filter.parquet", answers)
        self.frames["vlm_filter"] = answers
        return len(answers), asked

    def caption(self, stores: Path, workers: int) -> tuple[int, int]:
        with contextlib.redirect_stderr(io.StringIO()):  # caption.py's bar ignores TQDM_DISABLE
            return self._caption(stores, workers)

    def _caption(self, stores: Path, workers: int) -> tuple[int, int]:
        cfg = CaptionConfig(captioner="transformers", model=str(self.models["caption"]), workers=workers, batch_size=16, max_new_tokens=20)
        filters = {"watermark": self.frames["watermark"], "vlm_filter": self.frames["vlm_filter"]}
        captioned, counts = caption_dataset(self.frames["manifest"], filters, make_captioner(cfg), stores / "caption", cfg.batch_size, cfg.max_pixels, cfg.workers, cfg.overwrite)
        dataset, captions = finish_captions(captioned, cfg)
        write_parquet(stores / "curated" / "dataset.parquet", dataset)
        write_parquet(stores / "curated" / "captions.parquet", captions)
        return len(captions), counts["captioned"]


def serial_baseline(chain: Chain, stage: str) -> tuple[float, float]:
    """(decode + prepare seconds, model seconds) of the stage's images done one after the other in one
    thread: what the stage would cost if decoding and preprocessing did not overlap the model."""
    from stagewise.curation.caption import ImageRef
    from stagewise.curation.vlm import _ask_batch, load_for
    from stagewise.images import load_verified

    manifest = chain.frames["manifest"]
    rows = list(manifest[manifest["status"] == "kept"].itertuples(index=False))
    if stage == "vlm_filter":
        cfg = VlmConfig(model=str(chain.models["vqa"]), batch_size=8)
        model = load_for(cfg)
        load, run = (lambda row: model.prepare(load_verified(row.path, row.sha256, cfg.max_pixels))), (lambda imgs, _rows: _ask_batch(model, imgs, cfg))
        batch_size = cfg.batch_size
    else:
        captioner = make_captioner(CaptionConfig(captioner="transformers", model=str(chain.models["caption"]), max_new_tokens=20))
        load = lambda row: captioner.prepare(load_verified(row.path, row.sha256, 8192 * 8192))  # noqa: E731
        run = lambda imgs, batch: captioner.caption(imgs, [ImageRef(r.path, r.domain, r.sha256) for r in batch])  # noqa: E731
        batch_size = 16
    decode_s = model_s = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        t0 = time.perf_counter()
        images = [load(row) for row in batch]
        t1 = time.perf_counter()
        run(images, batch)
        decode_s, model_s = decode_s + t1 - t0, model_s + time.perf_counter() - t1
    return decode_s, model_s


def timed(step: Callable[[Path, int], tuple[int, int]], stores: Path, workers: int) -> tuple[float, int, int]:
    """(seconds, images handled, images computed rather than memoised)."""
    start = time.perf_counter()
    handled, computed = step(stores, workers)
    return time.perf_counter() - start, handled, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="candidate files in all (sample + dreambooth + padding)")
    parser.add_argument("--new-percent", type=float, default=1.0, help="images added before the rerun, as a %% of --images")
    parser.add_argument("--dreambooth", type=Path, default=DREAMBOOTH, help="folder of real photos used when present (default: %(default)s)")
    # A shared machine only ever slows a run down: each figure is the best of this many runs, 1 and 2
    # workers alternating, each into empty stores.
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, the best kept (default: %(default)s)")
    parser.add_argument("--watermark-repeat", type=int, default=1, help="the text detector takes about 1-2 min per run of 400 images on 2 cores")
    # 1: on this shared 2-core machine a second OpenMP thread spinning against the decode workers made a
    # tiny generate() up to 100x slower; a real model on a GPU does not use these threads at all.
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads for the model stages (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.torch_threads)
    from transformers.utils import logging as hf_logging

    from tiny_models import tiny_blip

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory(prefix="curation-bench-") as tmp:
        work = Path(tmp)
        models = {"vqa": tiny_blip(work / "models" / "vqa", "vqa"), "caption": tiny_blip(work / "models" / "caption", "caption")}
        domains = build_images(work / "images", args.images, args.dreambooth)
        total = sum(1 for _ in scan(domains))
        sources = ", ".join(f"{name} {sum(1 for _ in scan({name: path}))}" for name, path in domains.items())
        print(f"{total} candidate files ({sources}); {os.cpu_count()} cpus, torch {args.torch_threads} thread(s); tiny BLIP models; "
              f"best of {args.repeat} (watermark {args.watermark_repeat})")  # fmt: skip

        chain = Chain(domains, models)
        best: dict[tuple[str, int], tuple[float, int, int]] = {}
        serial: dict[str, tuple[float, float]] = {}
        for stage in STAGES:
            repeat = args.watermark_repeat if stage == "watermark" else args.repeat
            for attempt in range(repeat):
                if stage in ("vlm_filter", "caption"):
                    decode_s, model_s = serial_baseline(chain, stage)
                    if stage not in serial or decode_s + model_s < sum(serial[stage]):
                        serial[stage] = (decode_s, model_s)
                for workers in (1, 2):
                    # The last 2-worker run of each stage leaves its stores in stores-2: the rerun's starting point.
                    stores = work / ("stores-2" if workers == 2 and attempt == repeat - 1 else f"scratch-{stage}-{attempt}-{workers}")
                    result = timed(getattr(chain, stage), stores, workers)
                    if (stage, workers) not in best or result[0] < best[stage, workers][0]:
                        best[stage, workers] = result
                    if stores.name.startswith("scratch"):
                        shutil.rmtree(stores)

        print(f"\n{'stage':<11} {'images':>7} {'1 worker img/s':>15} {'2 workers img/s':>16} {'2 / 1':>6}")
        for stage in STAGES:
            (t1, n, _), (t2, _, _) = best[stage, 1], best[stage, 2]
            print(f"{stage:<11} {n:>7} {n / t1:>15.1f} {n / t2:>16.1f} {t1 / t2:>6.2f}")
        full = sum(best[stage, 2][0] for stage in STAGES)
        print(f"{'chain':<11} {'':>7} {sum(best[stage, 1][0] for stage in STAGES):>14.1f}s {full:>15.1f}s")

        print("\nthe same images decoded + preprocessed, then run through the model, batch by batch in one thread (no overlap), against the stage:")
        for stage in ("vlm_filter", "caption"):
            decode_s, model_s = serial[stage]
            t1, t2 = best[stage, 1][0], best[stage, 2][0]
            print(f"  {stage:<11} decode+prepare {decode_s:5.2f} s + model {model_s:5.2f} s = {decode_s + model_s:5.2f} s serial; "
                  f"stage {t1:5.2f} s at 1 worker ({t1 / (decode_s + model_s):.0%}), {t2:5.2f} s at 2 ({t2 / (decode_s + model_s):.0%})")  # fmt: skip

        new = max(1, math.ceil(total * args.new_percent / 100))
        make_good(domains["pad"] / "added", new, seed=99, size_px=512)
        rerun = {stage: timed(getattr(chain, stage), work / "stores-2", 2) for stage in STAGES}
        again = sum(t for t, _, _ in rerun.values())
        print(f"\nrerun after adding {new} images ({new / total:.1%}) to {total}, 2 workers: {again:.2f} s = {again / full:.1%} of the full run's {full:.1f} s")
        for stage in STAGES:
            seconds, handled, computed = rerun[stage]
            print(f"  {stage:<11} {seconds:6.2f} s  ({computed} of {handled} images computed, the rest memoised)")


if __name__ == "__main__":
    main()
