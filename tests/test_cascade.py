"""The watermark cascade: the real text detector decides the clear cases; only images whose text score is
in the uncertain band reach CLIP (a tiny random open_clip model loaded from its checkpoint) and then a
VLM (a tiny random BLIP-VQA); every step is memoised and the reason names the step that decided.

A random model's answers mean nothing, so each test first records what the model says (its probability,
its answer) and then sets the CLIP threshold or the VLM's reject answer relative to that: the routing is
what is tested, with real model outputs."""

import json
import re
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

from stagewise.cli import StageError
from stagewise.config import ParamsError, parse_section
from stagewise.curation import vlm
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.curation.stamp import Stamp, stamp
from stagewise.curation.watermark import WATERMARK_QUESTION, WatermarkConfig, run_cascade, score_images
from stagewise.io import read_parquet_dir
from stagewise.sample import stamp_watermark
from tiny_clip import tiny_clip
from tiny_models import tiny_blip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def crop(box, size_px=320):
    return Image.fromarray(skimage.data.chelsea()).crop(box).resize((size_px, size_px), Image.LANCZOS)


def centre_text(img, text, size_frac):
    return stamp(img, Stamp(kind="text", placement="centre", opacity=0.6, size_frac=size_frac, colour="white", outline=True, font="pillow-default", text=text))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two plain crops, three one-line stamps of different sizes and a heavy three-line stamp, scored
    once with the cascade off; the band is then set from the real scores."""
    root = tmp_path_factory.mktemp("cascade")
    folder = root / "in"
    folder.mkdir()
    crop((20, 0, 300, 280)).save(folder / "plain_0.png")
    crop((150, 20, 430, 300)).save(folder / "plain_1.png")
    for i, (text, size) in enumerate([("© STOCKPHOTO", 0.09), ("SAMPLE PREVIEW", 0.07), ("watermark.com", 0.11)]):
        centre_text(crop((40 + 30 * i, 0, 320 + 30 * i, 280)), text, size).save(folder / f"line_{i}.png")
    stamp_watermark(crop((100, 0, 380, 280)), "© STOCKPHOTO", 0.6, np.random.default_rng(0)).save(folder / "heavy.png")
    manifest = ingest({"a": folder}, IngestConfig(), root / "ingest")[0]
    frame, _ = score_images(manifest, WatermarkConfig(), root / "detector")
    scores = dict(zip(frame["path"].str.rsplit("/", n=1).str[-1], frame["score"]))
    lines = sorted(scores[f"line_{i}.png"] for i in range(3))
    assert scores["plain_0.png"] == scores["plain_1.png"] == 0 and 0 < lines[0] and lines[-1] < scores["heavy.png"], scores
    # Band: from the weakest one-line stamp up to (not including) the heavy stamp; the threshold at its bottom.
    band = {"band_low": lines[0], "band_high": scores["heavy.png"], "threshold": lines[0]}
    return root, manifest, scores, band


def names(frame, mask):
    return set(frame.loc[mask, "path"].str.rsplit("/", n=1).str[-1])


def test_only_uncertain_images_reach_clip_and_reasons_name_the_step(scored, tmp_path):
    root, manifest, scores, band = scored
    clip = tiny_clip(tmp_path / "clip-model")
    cfg = WatermarkConfig(**band, clip={**clip, "threshold": 0.999})  # nothing is that sure: CLIP keeps all
    frame, counts = run_cascade(manifest, cfg, root / "detector", clip_store=tmp_path / "clip")
    uncertain = {f"line_{i}.png" for i in range(3)}
    # The detector's boxes are memoised; only the three band images reach CLIP.
    assert counts == {"detected": 0, "uncertain": 3, "clip_embedded": 3, "vlm_asked": 0, "headed": 0, "head_on": 0}  # no learned head here
    assert names(frame, frame["clip_p"].notna()) == uncertain
    stored = read_parquet_dir(tmp_path / "clip" / "images")
    assert set(stored["sha256"]) == set(frame.loc[frame["clip_p"].notna(), "sha256"])  # CLIP saw nothing else

    by_name = frame.assign(name=frame["path"].str.rsplit("/", n=1).str[-1]).set_index("name")
    assert (by_name.loc[["plain_0.png", "plain_1.png"], ["status", "decided_by"]].values == [["kept", "text detector"]] * 2).all()
    heavy = by_name.loc["heavy.png"]
    assert heavy["status"] == "rejected" and heavy["decided_by"] == "text detector"
    assert heavy["reason"] == f"watermark: text detector score {scores['heavy.png']:.3f} > threshold {band['threshold']:g}"
    assert set(by_name.loc[sorted(uncertain), "decided_by"]) == {"clip"} and set(by_name.loc[sorted(uncertain), "status"]) == {"kept"}

    # CLIP decides from the memo: a threshold just below the lowest probability rejects all three, naming
    # CLIP, its probability and the uncertain text score; nothing is embedded or detected again.
    p = by_name.loc[sorted(uncertain), "clip_p"]
    strict = WatermarkConfig(**band, clip={**clip, "threshold": float(p.min()) - 1e-4, "keep_below": 0.0})
    again, counts = run_cascade(manifest, strict, root / "detector", clip_store=tmp_path / "clip")
    assert counts["detected"] == 0 and counts["clip_embedded"] == 0
    rejected = again[again["decided_by"] == "clip"]
    assert names(again, again["decided_by"] == "clip") == uncertain and set(rejected["status"]) == {"rejected"}
    for row in rejected.itertuples():
        assert re.fullmatch(rf"watermark: CLIP p={row.clip_p:.3f} > {strict.clip.threshold:g} \(uncertain text score {row.score:.3f}\)", row.reason), row.reason


def test_clip_leaves_unsure_images_to_the_vlm(scored, tmp_path):
    root, manifest, scores, band = scored
    clip = tiny_clip(tmp_path / "clip-model")
    blip = tiny_blip(tmp_path / "blip-vqa")
    probe, _ = score_images(manifest, WatermarkConfig(**band, clip={**clip, "threshold": 0.999}), root / "detector", clip_store=tmp_path / "clip")
    p = probe.set_index("path")["clip_p"].dropna()
    # CLIP rejects the most watermark-like band image, keeps the least, and leaves the middle one to the VLM.
    ordered = p.sort_values()
    assert ordered.iloc[0] < ordered.iloc[1] < ordered.iloc[2], ordered
    clip_step = {**clip, "keep_below": float(ordered.iloc[:2].mean()), "threshold": float(ordered.iloc[1:].mean())}
    middle = ordered.index[1]
    said = vlm.ask([middle], vlm.VlmConfig(model=str(blip), questions=[{"text": WATERMARK_QUESTION}]))[0][WATERMARK_QUESTION]
    said_first = vlm.normalize(said).split()[0]

    cfg = WatermarkConfig(**band, clip=clip_step, vlm={"model": str(blip), "questions": [{"text": WATERMARK_QUESTION, "reject": [said_first]}], "batch_size": 2})
    frame, counts = run_cascade(manifest, cfg, root / "detector", clip_store=tmp_path / "clip", vlm_store=tmp_path / "vlm")
    decided = frame.set_index("path")
    assert decided.loc[ordered.index[2], ["status", "decided_by"]].tolist() == ["rejected", "clip"]
    assert decided.loc[ordered.index[0], ["status", "decided_by"]].tolist() == ["kept", "clip"]
    assert decided.loc[middle, ["status", "decided_by"]].tolist() == ["rejected", "vlm"]
    assert counts["vlm_asked"] == 1  # only the image CLIP was unsure about
    assert json.loads(decided.loc[middle, "vlm_answers"]) == {WATERMARK_QUESTION: said}
    assert decided.loc[middle, "reason"] == (
        f"watermark: VLM answered {said!r} to {WATERMARK_QUESTION!r} "
        f"(uncertain text score {decided.loc[middle, 'score']:.3f}, CLIP p={decided.loc[middle, 'clip_p']:.3f})"
    )
    assert (decided.loc[decided["decided_by"] == "text detector", "vlm_answers"] == "").all()

    # VLM without CLIP: every band image is asked (the middle one's answer is memoised), none other.
    vlm_only = WatermarkConfig(**band, vlm={"model": str(blip), "questions": [{"text": WATERMARK_QUESTION, "reject": [said_first]}], "batch_size": 2})
    frame, counts = run_cascade(manifest, vlm_only, root / "detector", vlm_store=tmp_path / "vlm")
    assert counts["vlm_asked"] == 2 and frame["clip_p"].isna().all()
    assert names(frame, frame["decided_by"] == "vlm") == {f"line_{i}.png" for i in range(3)}


def test_without_clip_or_vlm_the_band_is_ignored(scored):
    root, manifest, scores, band = scored
    off, _ = score_images(manifest, WatermarkConfig(**band), root / "detector")
    assert set(off["decided_by"]) == {"text detector"} and off["clip_p"].isna().all()
    assert names(off, off["status"] == "rejected") == {p for p, s in scores.items() if s > band["threshold"]}


def test_cascade_settings_are_checked():
    with pytest.raises(ParamsError, match=r"watermark: .*need band_low <= threshold < band_high"):
        parse_section({"threshold": 0.2, "clip": {"model": "ViT-B-32", "pretrained": "openai"}}, WatermarkConfig, "watermark")
    parse_section({"threshold": 0.2}, WatermarkConfig, "watermark")  # cascade off: the band is unused
    with pytest.raises(ParamsError, match=r"watermark\.clip: .*keep_below \(0\.9\) must not exceed threshold \(0\.8\)"):
        parse_section({"clip": {"model": "ViT-B-32", "pretrained": "openai", "keep_below": 0.9}}, WatermarkConfig, "watermark")
    with pytest.raises(ParamsError, match=r"watermark\.clip\.prompts"):
        parse_section({"clip": {"model": "ViT-B-32", "pretrained": "openai", "prompts": []}}, WatermarkConfig, "watermark")


def test_missing_cascade_model_fails_before_the_detector_runs(scored, tmp_path):
    root, manifest, _, band = scored
    start = time.perf_counter()
    with pytest.raises(StageError, match=r"watermark\.clip\.pretrained: cannot load CLIP weights ViT-B-32/laion2b_s34b_b79k: this machine is offline"):
        score_images(manifest, WatermarkConfig(**band, clip={"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}), tmp_path / "detector")
    with pytest.raises(StageError, match=r"watermark\.vlm\.model: cannot load model 'org/no-such-vlm'"):
        score_images(manifest, WatermarkConfig(**band, vlm={"model": "org/no-such-vlm"}), tmp_path / "detector")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "detector").exists()  # failed before a single image was detected
