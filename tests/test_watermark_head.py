"""The learned watermark head: the EfficientNet-Lite0 backbone from its wheel, head training from a seed,
the head's files and their errors, and the watermark stage deciding with a head (real rapidocr, real
backbone; a small head trained once per module)."""

import json
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import ROOT, run
from stagewise.curation import wmhead
from stagewise.curation.backbone import load_backbone
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.curation.stamp import Stamp, stamp
from stagewise.curation.watermark import DECIDED_BY_HEAD, WatermarkConfig, run_cascade, text_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small enough for the default suite (a few seconds per training), big enough to find a clear mark.
SMALL = {"train_images": 64, "calibration_images": 32, "steps": 120}
TINY = {"train_images": 8, "calibration_images": 8, "steps": 5}
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_backbone_loads_offline_and_knows_a_cat():
    model = load_backbone()
    img = Image.fromarray(skimage.data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES, probs.topk(3)
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8
    assert not any(p.requires_grad for p in model.parameters())  # frozen


@pytest.fixture(scope="module")
def scorer():
    return text_scorer(WatermarkConfig())


def test_training_is_reproducible_from_a_seed(scorer):
    cfg = wmhead.HeadTrainConfig(**TINY)
    first, meta1 = wmhead.train(cfg, scorer)
    again, meta2 = wmhead.train(cfg, scorer)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # bit-identical
    assert meta1["combiner"] == meta2["combiner"] and meta1["threshold"] == meta2["threshold"]
    other, _ = wmhead.train(wmhead.HeadTrainConfig(**{**TINY, "seed": 1}), scorer)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, scorer):
    folder = tmp_path_factory.mktemp("head")
    state, meta = wmhead.train(wmhead.HeadTrainConfig(**SMALL), scorer)
    wmhead.save(folder, state, meta)
    return folder


def test_saved_head_round_trips(head_dir):
    loaded = wmhead.load(head_dir)
    meta = json.loads((head_dir / wmhead.META_FILE).read_text())
    assert loaded.meta["threshold"] == meta["threshold"] and loaded.top_k == SMALL.get("top_k", 4)
    assert wmhead.load(head_dir).model_hash == loaded.model_hash


def test_missing_or_corrupt_head_is_a_clear_error_naming_the_path(head_dir, tmp_path):
    with pytest.raises(wmhead.HeadError, match=rf"watermark head not found: {tmp_path / 'nowhere' / wmhead.META_FILE}"):
        wmhead.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / wmhead.META_FILE).write_text((head_dir / wmhead.META_FILE).read_text())
    with pytest.raises(wmhead.HeadError, match=rf"watermark head not found: {broken / wmhead.HEAD_FILE}"):
        wmhead.load(broken)
    (broken / wmhead.HEAD_FILE).write_bytes((head_dir / wmhead.HEAD_FILE).read_bytes()[:100])  # truncated
    (broken / wmhead.META_FILE).write_text((head_dir / wmhead.META_FILE).read_text())
    with pytest.raises(wmhead.HeadError, match=rf"do not match their metadata: {broken / wmhead.HEAD_FILE}"):
        wmhead.load(broken)
    (broken / wmhead.META_FILE).write_text("{not json")
    with pytest.raises(wmhead.HeadError, match=rf"metadata unreadable: {broken / wmhead.META_FILE}"):
        wmhead.load(broken)
    # The stage: one line naming the path, the user-error exit status, no traceback.
    manifest = tmp_path / "manifest.parquet"
    import pandas as pd

    pd.DataFrame({"path": [], "domain": [], "sha256": [], "status": []}).to_parquet(manifest)
    proc = run([sys.executable, "-m", "stages.watermark", "--manifest", str(manifest), "--out", str(tmp_path / "wm.parquet"),
                "--store", str(tmp_path / "store"), "--head", str(tmp_path / "nowhere"), "--params", str(ROOT / "params.yaml")],
               cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"watermark head not found: {tmp_path / 'nowhere'}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "wm.parquet").exists()


def test_a_disabled_head_leaves_the_text_detector_alone(tmp_path):
    """params.yaml's default (enabled: false): the stage writes a marker at once, and loading it gives no head."""
    run([sys.executable, "-m", "stages.watermark_head", "--out", str(tmp_path / "off"), "--params", str(ROOT / "params.yaml")], cwd=ROOT)
    assert wmhead.load(tmp_path / "off") is None and not (tmp_path / "off" / wmhead.HEAD_FILE).exists()


def test_a_planted_mark_is_found_and_the_clean_photo_kept(head_dir, tmp_path):
    """A tiled logo (no letters: the text detector alone misses it) and a text credit, planted in a photo
    with the evaluation's compositor, are rejected, the logo by the head; the clean photo is kept."""
    photo = Image.fromarray(skimage.data.coffee()).resize((480, 320), Image.LANCZOS)  # not a training crop size
    folder = tmp_path / "photos"
    folder.mkdir()
    photo.save(folder / "clean.jpg", quality=90)
    logo = Stamp(kind="logo", placement="tiled", opacity=0.5, size_frac=0.15, colour="white", outline=True, shape="ring-star", angle=30.0)
    text = Stamp(kind="text", placement="corner", opacity=0.5, size_frac=0.07, colour="white", outline=False, font="DejaVuSans-Bold",
                 text="© STOCKPHOTO", corner="bottom-right")
    stamp(photo, logo).save(folder / "logo.jpg", quality=90)
    stamp(photo, text).save(folder / "text.jpg", quality=90)
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    frame, counts = run_cascade(manifest, WatermarkConfig(), tmp_path / "store", head_dir=head_dir)
    by_name = {p.rsplit("/", 1)[-1]: r for p, r in zip(frame["path"], frame.to_dict("records"))}
    assert counts["headed"] == 3
    assert by_name["clean.jpg"]["status"] == "kept", by_name["clean.jpg"]
    logo_row = by_name["logo.jpg"]
    assert logo_row["status"] == "rejected" and logo_row["decided_by"] == DECIDED_BY_HEAD, logo_row
    assert logo_row["reason"].startswith("watermark: learned head P="), logo_row
    assert by_name["text.jpg"]["status"] == "rejected"  # by the text detector or the head
    for name in ("logo.jpg", "text.jpg"):
        assert by_name[name]["head_score"] > by_name["clean.jpg"]["head_score"], by_name
    # Memoised by content hash + head hash: a rerun runs neither model.
    again, counts = run_cascade(manifest, WatermarkConfig(), tmp_path / "store", head_dir=head_dir)
    assert counts["headed"] == 0 and counts["detected"] == 0 and list(again["status"]) == list(frame["status"])


def test_the_sample_keeps_its_verdicts_with_the_head(sample_dir, head_dir, tmp_path):
    """The embedded demo: its three stamped copies rejected, every clean crop kept."""
    manifest, _ = ingest({"a": sample_dir / "a", "b": sample_dir / "b"}, IngestConfig(), tmp_path / "ingest")
    frame, _ = run_cascade(manifest, WatermarkConfig(), tmp_path / "store", head_dir=head_dir)
    stamped = {str(sample_dir / p) for p in json.loads((sample_dir / "defects.json").read_text())["watermark"]}
    assert set(frame.loc[frame["status"] == "rejected", "path"]) == stamped, frame[["path", "status", "head_p", "score"]].to_string()
