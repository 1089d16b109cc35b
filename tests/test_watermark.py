"""The watermark stage with rapidocr's real bundled text detector, on the embedded sample and tiny
synthetic cases built from a real photo."""

import json
import re
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from conftest import ROOT, run
from stagewise.config import ParamsError, parse_section
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.curation.watermark import WatermarkConfig, bundled_model_path, detector_fingerprint, score_images

REASON = re.compile(rf"watermark: text detector score \d\.\d{{3}} > threshold {re.escape(format(WatermarkConfig().threshold, 'g'))}")


@pytest.fixture(scope="module")
def sample_scored(sample_dir, tmp_path_factory):
    """The sample scored once with the default settings; its detector store is reused below."""
    tmp = tmp_path_factory.mktemp("watermark")
    manifest, _ = ingest({"a": sample_dir / "a", "b": sample_dir / "b"}, IngestConfig(), tmp / "ingest")
    frame, detected = score_images(manifest, WatermarkConfig(), tmp / "store")
    stamped = {str(sample_dir / p) for p in json.loads((sample_dir / "defects.json").read_text())["watermark"]}
    return manifest, frame, detected, tmp / "store", stamped


def test_sample_rejects_exactly_the_stamped_copies(sample_scored):
    manifest, frame, detected, _, stamped = sample_scored
    kept = manifest[manifest["status"] == "kept"]
    assert list(frame["path"]) == list(kept["path"])  # one row per manifest-kept image, nothing else
    assert detected == len(kept)
    rejected = frame[frame["status"] == "rejected"]
    assert set(rejected["path"]) == stamped
    assert all(REASON.fullmatch(r) for r in rejected["reason"]), list(rejected["reason"])
    assert (rejected["n_boxes"] >= 1).all() and (rejected["decided_by"] == "text detector").all()
    clean = frame[frame["status"] == "kept"]
    assert (clean["reason"] == "").all()
    print(f"\nclean max score {clean['score'].max():.3f}, stamped min score {rejected['score'].min():.3f}")
    assert rejected["score"].min() > 5 * max(clean["score"].max(), WatermarkConfig().threshold)  # margin both ways


def test_decisions_change_without_running_the_detector(sample_scored):
    manifest, first, _, store, stamped = sample_scored
    relaxed, detected = score_images(manifest, WatermarkConfig(threshold=0.5), store)
    assert detected == 0
    assert (relaxed["status"] == "kept").all()
    np.testing.assert_allclose(relaxed["score"], first["score"])

    # Counting squat boxes as text too: the stars of the flag behind Grace Hopper then read as text and
    # clean crops are rejected. This is what min_line_aspect is for.
    every_box, detected = score_images(manifest, WatermarkConfig(min_line_aspect=1.0), store)
    assert detected == 0
    clean_b = every_box[(every_box["domain"] == "b") & ~every_box["path"].isin(stamped)]
    assert (clean_b["status"] == "rejected").sum() >= 5
    assert (first.loc[clean_b.index, "n_ignored_boxes"] > 0).sum() >= 5  # same boxes, ignored by default


def photo_crop(box, size_px=320):
    return Image.fromarray(skimage.data.chelsea()).crop(box).resize((size_px, size_px), Image.LANCZOS)


def stamp_line(img, text):
    """One semi-transparent line of text across the middle, as a stock-photo stamp."""
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=base.width // 9)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    xy = ((base.width - (right - left)) / 2, (base.height - (bottom - top)) / 2)
    draw.text(xy, text, font=font, fill=(255, 255, 255, 140), stroke_width=2, stroke_fill=(0, 0, 0, 140))
    return Image.alpha_composite(base, layer).convert("RGB")


def scan(folder, tmp_path):
    return ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")[0]


def test_one_stamped_line_is_detected_and_a_plain_crop_is_not(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo_crop((20, 0, 300, 280)).save(folder / "plain.png")
    stamp_line(photo_crop((20, 0, 300, 280)), "© STOCKPHOTO").save(folder / "stamped.png")
    frame, detected = score_images(scan(folder, tmp_path), WatermarkConfig(), tmp_path / "store")
    rows = {p.rsplit("/", 1)[-1]: r for p, r in zip(frame["path"], frame.to_dict("records"))}
    assert detected == 2
    assert rows["plain.png"]["status"] == "kept" and rows["plain.png"]["score"] == 0
    stamped = rows["stamped.png"]
    assert stamped["status"] == "rejected" and REASON.fullmatch(stamped["reason"])
    assert stamped["n_boxes"] >= 1 and stamped["max_confidence"] > 0.5 and 0 < stamped["text_area_frac"] < 0.5


def test_only_new_images_are_detected_and_detector_settings_invalidate(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, box in enumerate([(0, 0, 200, 200), (100, 50, 300, 250), (200, 100, 400, 300)]):
        photo_crop(box, 160).save(folder / f"old_{i}.png")
    first, detected = score_images(scan(folder, tmp_path), WatermarkConfig(), tmp_path / "store")
    assert detected == 3
    photo_crop((50, 0, 250, 200), 160).save(folder / "new_0.png")
    stamp_line(photo_crop((150, 50, 350, 250)), "SAMPLE PREVIEW").save(folder / "new_1.png")
    second, detected = score_images(scan(folder, tmp_path), WatermarkConfig(), tmp_path / "store")
    assert detected == 2
    assert second.set_index("path").loc[first["path"]].reset_index().equals(first)
    assert second.loc[second["path"].str.endswith("new_1.png"), "status"].item() == "rejected"
    _, detected = score_images(scan(folder, tmp_path), WatermarkConfig(limit_side_len=256), tmp_path / "store")
    assert detected == 5  # a detector setting changed: every memoised box is stale


def test_fingerprint_covers_detector_settings_only():
    model = bundled_model_path()
    base = detector_fingerprint(WatermarkConfig(), model)
    for decision_only in ({"threshold": 0.3}, {"min_line_aspect": 4.0}, {"workers": 7}, {"threads_per_worker": 3}):
        assert detector_fingerprint(WatermarkConfig(**decision_only), model) == base
    for decision_only in ({"edge_threshold": 0.01}, {"edge_max_box_frac": 0.5}):
        assert detector_fingerprint(WatermarkConfig(**decision_only), model) == base
    for detector in ({"limit_side_len": 640}, {"box_thresh": 0.6}, {"edge_strip_frac": 0.2}, {"edge_side_px": 768}):
        assert detector_fingerprint(WatermarkConfig(**detector), model) != base


def test_bad_images_are_rejected_with_a_reason_not_a_crash(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo_crop((0, 0, 280, 280), 200).save(folder / "good.png")
    photo_crop((100, 0, 380, 280), 300).save(folder / "large.png")
    photo_crop((40, 0, 320, 280), 200).save(folder / "changed.png")
    photo_crop((60, 0, 340, 280), 200).save(folder / "vanished.png")
    manifest = scan(folder, tmp_path)
    original = (folder / "changed.png").read_bytes()
    (folder / "changed.png").write_bytes(original[: len(original) // 2])  # edited after ingest
    (folder / "vanished.png").unlink()
    # 250 x 250: below large.png, which ingest (default max_pixels) kept; decoding it here must fail cleanly.
    cfg = WatermarkConfig(max_pixels=250 * 250)
    frame, detected = score_images(manifest, cfg, tmp_path / "store")
    reasons = {p.rsplit("/", 1)[-1]: (r["status"], r["reason"], r["decided_by"]) for p, r in zip(frame["path"], frame.to_dict("records"))}
    assert detected == 1
    assert reasons["good.png"] == ("kept", "", "text detector")
    assert reasons["large.png"][0] == "rejected" and reasons["large.png"][1].startswith("too large: 300x300")
    assert reasons["changed.png"][:2] == ("rejected", "changed since ingest: content differs from the manifest's sha256 (rerun ingest)")
    assert reasons["vanished.png"][:2] == ("rejected", "unreadable: broken symlink or vanished file")
    assert {r[2] for name, r in reasons.items() if name != "good.png"} == {"decode"}
    (folder / "changed.png").write_bytes(original)  # fixed: errors are not memoised, so it is detected now
    _, detected = score_images(manifest, cfg, tmp_path / "store")
    assert detected == 1


def test_missing_model_file_is_a_clear_error(tmp_path, sample_scored):
    manifest = sample_scored[0]
    with pytest.raises(FileNotFoundError, match="text detector model not found: .*nope.onnx"):
        score_images(manifest, WatermarkConfig(), tmp_path / "store", model_path=tmp_path / "nope.onnx")


def test_bad_params_name_the_key():
    with pytest.raises(ParamsError, match=r"watermark\.threshold: .*greater than or equal to 0"):
        parse_section({"threshold": -0.1}, WatermarkConfig, "watermark")
    with pytest.raises(ParamsError, match=r"watermark\.treshold: unknown key; allowed keys: .*threshold"):
        parse_section({"treshold": 0.1}, WatermarkConfig, "watermark")



def test_stage_without_a_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("watermark:\n  threshold: 0.1\n")
    args = ["--manifest", "nope.parquet", "--out", "watermark.parquet", "--store", "store"]
    proc = run([sys.executable, "-m", "stages.watermark", *args], tmp_path, check=False, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "error: manifest not found: nope.parquet (run the ingest stage first)" in proc.stderr


def test_the_detail_layer_finds_a_mark_the_plain_image_hides():
    """A 40 % white text stamp in a corner of scikit-image's grass photo: the detector finds no text line
    in the plain image and one in the detail layer (image - blur, x gain); the clean photo has none in
    either. The detail-layer settings are part of the fingerprint, so changing them re-runs the detector."""
    from stagewise.curation.stamp import random_stamp, stamp
    from stagewise.curation.watermark import TextDetector, score_boxes

    photo = Image.fromarray(skimage.data.grass()).convert("RGB")
    marked = stamp(photo, random_stamp(np.random.default_rng(1), "text", "corner", opacity=0.4))
    plain, detail = WatermarkConfig(highpass_sigma_px=0), WatermarkConfig()

    def score(cfg: WatermarkConfig, img: Image.Image) -> float:
        detector = TextDetector(cfg, None, 1)
        seen = detector.prepare(img)
        return score_boxes(detector.detect(seen), seen.width, seen.height, cfg.min_line_aspect).score

    assert score(plain, marked) == 0.0 and score(detail, marked) > detail.threshold
    assert score(plain, photo) == score(detail, photo) == 0.0
    assert detector_fingerprint(plain, bundled_model_path()) != detector_fingerprint(detail, bundled_model_path())


def test_a_small_credit_on_the_edge_is_caught_by_the_edge_strips(tmp_path):
    """A URL 3 % of the height tall, 50 % white, in the bottom-right corner of
    the astronaut photo: too small a share of the image for the whole-image score (kept with the strips
    off), found in the edge strips (rejected, decided_by "edge text"); the clean photo is kept either way.
    Only decision params changed between the runs below, so the detector runs once per image."""
    from stagewise.curation.stamp import Stamp, stamp

    folder = tmp_path / "in"
    folder.mkdir()
    photo = Image.fromarray(skimage.data.astronaut()).convert("RGB")
    photo.save(folder / "plain.png")
    spec = Stamp(kind="text", placement="corner", opacity=0.5, size_frac=0.03, colour="white", outline=False, font="DejaVuSans",
                 text="www.example.com", corner="bottom-right")
    stamp(photo, spec).save(folder / "credit.png")
    manifest = scan(folder, tmp_path)
    frame, detected = score_images(manifest, WatermarkConfig(), tmp_path / "store")
    rows = {p.rsplit("/", 1)[-1]: r for p, r in zip(frame["path"], frame.to_dict("records"))}
    assert detected == 2
    credit, plain = rows["credit.png"], rows["plain.png"]
    assert credit["score"] <= WatermarkConfig().threshold < credit["edge_score"]  # the whole-image score misses it
    assert (credit["status"], credit["decided_by"]) == ("rejected", "edge text")
    assert credit["reason"].startswith("watermark: text along the top or bottom edge, edge score 0.0")
    assert (plain["status"], plain["edge_score"]) == ("kept", 0.0)
    # A higher edge threshold is a decision: the memoised boxes are rescored, the detector does not run.
    loose, detected = score_images(manifest, WatermarkConfig(edge_threshold=0.5), tmp_path / "store")
    assert detected == 0 and set(loose["status"]) == {"kept"}
    off, detected = score_images(manifest, WatermarkConfig(edge_strip_frac=0), tmp_path / "store2")
    assert detected == 2 and set(off["status"]) == {"kept"} and set(off["edge_score"]) == {0.0}


def test_the_int8_detector_is_quantized_once_from_a_seed_and_finds_what_float32_finds(tmp_path, monkeypatch):
    """The default detector is the bundled one quantized here: built into the cache once (the same bytes
    from the same seed), memoised apart from float32's boxes, and it decides a stamped line and a plain
    crop as float32 does."""
    from stagewise.curation.int8 import int8_model
    from stagewise.curation.watermark import detector_model

    int8, fp32 = detector_model(WatermarkConfig()), detector_model(WatermarkConfig(detector_int8=False))
    assert fp32 == bundled_model_path() and int8 != fp32 and int8.stat().st_size < fp32.stat().st_size / 2
    assert detector_fingerprint(WatermarkConfig(), int8) != detector_fingerprint(WatermarkConfig(), fp32)
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path / "cache"))
    fresh = int8_model(fp32)
    assert fresh.parent.parent == tmp_path / "cache" and fresh.read_bytes() == int8.read_bytes()
    built = fresh.stat().st_mtime_ns
    assert int8_model(fp32) == fresh and fresh.stat().st_mtime_ns == built  # cached: not quantized again

    folder = tmp_path / "in"
    folder.mkdir()
    photo_crop((20, 0, 300, 280)).save(folder / "plain.png")
    stamp_line(photo_crop((20, 0, 300, 280)), "© STOCKPHOTO").save(folder / "stamped.png")
    manifest = scan(folder, tmp_path)
    verdicts = {}
    for name, cfg in (("int8", WatermarkConfig()), ("fp32", WatermarkConfig(detector_int8=False))):
        frame, detected = score_images(manifest, cfg, tmp_path / "store")  # one store: each model its own boxes
        assert detected == 2
        verdicts[name] = {p.rsplit("/", 1)[-1]: s for p, s in zip(frame["path"], frame["status"])}
    assert verdicts["int8"] == verdicts["fp32"] == {"plain.png": "kept", "stamped.png": "rejected"}
