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
from safetensors.torch import load_file

from conftest import ROOT, run
from stagewise.curation import wmhead
from stagewise.curation.backbone import load_backbone
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.curation.stamp import Stamp, stamp
from stagewise.curation.watermark import DECIDED_BY_HEAD, WatermarkConfig, run_cascade, text_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small enough for the default suite (a few seconds per training), big enough to find a clear mark.
SMALL = {"train_images": 96, "calibration_images": 64, "steps": 200, "hidden_channels": 16}
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


def test_training_is_reproducible_from_a_seed(scorer, tmp_path):
    cfg = wmhead.HeadTrainConfig(**TINY)
    first, meta1 = wmhead.train(cfg, scorer)
    again, meta2 = wmhead.train(cfg, scorer)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # bit-identical
    assert meta1["combiner"] == meta2["combiner"] and meta1["threshold"] == meta2["threshold"]
    other, _ = wmhead.train(wmhead.HeadTrainConfig(**{**TINY, "seed": 1}), scorer)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # A fresh process, whose first training also builds the backbone, trains the same weights.
    code = (f"from safetensors.torch import save_file; from stagewise.curation import wmhead; from stagewise.curation.watermark import "
            f"WatermarkConfig, text_scorer; save_file(wmhead.train(wmhead.HeadTrainConfig(**{TINY!r}), text_scorer(WatermarkConfig()))[0], {str(tmp_path / 'fresh.safetensors')!r})")
    run([sys.executable, "-c", code], cwd=ROOT)
    fresh = load_file(str(tmp_path / "fresh.safetensors"))
    assert all(torch.equal(first[k], fresh[k]) for k in first), "a fresh process trained other weights from the same seed"


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


def test_calibration_photos_are_whole_folders_the_head_never_trains_on():
    """Photos of one subject look alike: the combiner's threshold is fitted on folders the head never saw."""
    photos = [(f"/photos/subject{g}/{i}.jpg", Image.new("RGB", (8, 8), (g, i, 0))) for g in range(6) for i in range(3)]
    photos += [(f"skimage:{name}", Image.new("RGB", (8, 8), (99, k, 0))) for k, name in enumerate(["astronaut", "coffee", "rocket"])]
    train, cal = wmhead.calibration_split(photos)
    folder_of = {id(img): name.rsplit("/", 1)[0] for name, img in photos}
    assert len(train) + len(cal) == len(photos) and cal and train
    assert not {folder_of[id(i)] for i in train} & {folder_of[id(i)] for i in cal}
    assert any(folder_of[id(i)].startswith("/photos/") for i in cal)  # real folders are held out too, not only bundled photos


def test_edge_strips_see_the_border_at_twice_the_resolution():
    photo = Image.fromarray(skimage.data.astronaut()).resize((1000, 750))
    whole, top, bottom = wmhead.views(photo, 384, 0.1)
    assert whole.shape[2:] == (288, 384) and top.shape[2:] == bottom.shape[2:] == (58, 768)
    big = wmhead.to_tensor(photo, 768)
    assert torch.equal(top, big[:, :, :58]) and torch.equal(bottom, big[:, :, -58:])
    assert len(wmhead.views(photo, 384, 0.0)) == 1
    # A small credit in the bottom-right corner: ink in the bottom strip's right cells, none in the top strip.
    coverage = np.zeros((576, 768), np.float32)
    coverage[-20:-10, 600:700] = 1
    t_whole, t_top, t_bottom = wmhead.cell_targets(coverage, (288, 384), 0.1)
    assert t_whole.shape == (36, 48) and t_top.shape == t_bottom.shape == (8, 96)
    assert t_top.sum() == 0 and t_bottom[:, 75:88].sum() > 0 and t_bottom[:, :74].sum() == 0 and t_whole[-2:, 37:44].sum() > 0


def test_a_missing_photo_folder_is_a_clear_error_naming_the_key(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["watermark_head"].update(enabled=True, photo_folders=[str(tmp_path / "no-such-folder")])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run([sys.executable, "-m", "stages.watermark_head", "--out", str(tmp_path / "head"), "--params", str(tmp_path / "params.yaml")],
               cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"watermark_head.photo_folders / --photos: clean photo folder not found: {tmp_path / 'no-such-folder'}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "head" / wmhead.HEAD_FILE).exists()
