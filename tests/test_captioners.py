"""The transformers captioner on tiny random BLIP and ViT-GPT-2 models loaded through from_pretrained,
and what the caption stage does with every caption afterwards: prefix/suffix, deterministic tag
shuffling, and the caption_filter that makes the dataset a subset."""

import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, run
from stagewise.cli import StageError
from stagewise.config import ParamsError, parse_section
from stagewise.curation import vlm
from stagewise.curation.caption import CAPTIONS_COLUMNS, DATASET_COLUMNS, CaptionConfig, caption_dataset, finish_captions, make_captioner, shuffle_tags
from stagewise.curation.captioners import ModelCaptioner
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.images import load_rgb
from tiny_models import tiny_blip, tiny_vit_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": tiny_blip(root / "blip", task="caption"), "vit-gpt2": tiny_vit_gpt2(root / "vit-gpt2"), "vqa": tiny_blip(root / "vqa")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caption-images")
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64 + 3 * i, 70, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    (folder / "img_0.txt").write_text("a hand-written sidecar caption")
    manifest, _ = ingest({"a": folder}, IngestConfig(), folder.parent / f"{folder.name}-ingest")
    return folder, manifest


def names(frame):
    return {os.path.basename(p): r for p, r in zip(frame["path"], frame.to_dict("records"))}


@pytest.mark.parametrize("name, model_class", [("blip", "BlipForConditionalGeneration"), ("vit-gpt2", "VisionEncoderDecoderModel")])
def test_model_captions_batched_memoised_sidecar_wins(name, model_class, models, images, tmp_path, monkeypatch):
    folder, manifest = images
    cfg = CaptionConfig(captioner="transformers", model=str(models[name]), batch_size=2, max_new_tokens=12)
    captioner = make_captioner(cfg)
    assert isinstance(captioner, ModelCaptioner)
    dataset, counts = caption_dataset(manifest, {}, captioner, tmp_path / "store", cfg.batch_size, workers=2)
    assert type(captioner.model.model).__name__ == model_class and captioner.model.calls == 2  # 4 images in batches of 2
    rows = names(dataset)
    assert rows["img_0.png"]["caption"] == "a hand-written sidecar caption" and rows["img_0.png"]["caption_source"] == "sidecar"
    made = {k: r["caption"] for k, r in rows.items() if r["caption_source"] == "model"}
    assert sorted(made) == ["img_1.png", "img_2.png", "img_3.png", "img_4.png"] and counts["captioned"] == 4
    # Each caption is the model's for that image: one image at a time through the same model agrees,
    # and the images get different captions, so a batch mix-up would show.
    alone = {k: captioner.model.generate([load_rgb(folder / k, cfg.max_pixels)], None, cfg.max_new_tokens)[0] for k in made}
    assert made == alone and len(set(made.values())) > 1

    monkeypatch.setattr(vlm, "load_image_text_model", lambda *a, **k: pytest.fail("model loaded although every caption is memoised"))
    again, counts = caption_dataset(manifest, {}, make_captioner(cfg), tmp_path / "store", cfg.batch_size)
    assert counts["memoised"] == 4 and counts["captioned"] == 0
    pd.testing.assert_frame_equal(again, dataset)
    monkeypatch.undo()

    overwritten, counts = caption_dataset(manifest, {}, make_captioner(cfg), tmp_path / "store", cfg.batch_size, overwrite=True)
    assert counts["captioned"] == 1 and counts["sidecar"] == 0  # only the sidecar image was new to the model
    assert names(overwritten)["img_0.png"]["caption_source"] == "model"


def test_blip_prompt_is_continued_and_fingerprinted(models, images, tmp_path):
    _, manifest = images
    cfg = CaptionConfig(captioner="transformers", model=str(models["blip"]), prompt="a photo of", max_new_tokens=6)
    dataset, _ = caption_dataset(manifest, {}, make_captioner(cfg), tmp_path / "store", overwrite=True)
    assert all(c.startswith("a photo of") for c in dataset["caption"]), list(dataset["caption"])
    assert make_captioner(cfg).fingerprint != make_captioner(cfg.model_copy(update={"prompt": "a picture of"})).fingerprint
    assert make_captioner(cfg).fingerprint == make_captioner(cfg.model_copy(update={"batch_size": 3, "prefix": "x, "})).fingerprint


def test_wrong_kind_of_model_is_refused(models, images, tmp_path):
    _, manifest = images
    with pytest.raises(StageError, match="question-answering model; use it as vlm_filter.model"):
        caption_dataset(manifest, {}, make_captioner(CaptionConfig(captioner="transformers", model=str(models["vqa"]))), tmp_path / "a", overwrite=True)
    with pytest.raises(StageError, match="vision-encoder-decoder model, which takes no prompt"):
        caption_dataset(manifest, {}, make_captioner(CaptionConfig(captioner="transformers", model=str(models["vit-gpt2"]), prompt="a photo of")), tmp_path / "b", overwrite=True)
    with pytest.raises(ParamsError, match=r"captioner transformers needs caption\.model"):
        parse_section({"captioner": "transformers"}, CaptionConfig, "caption")


def frame_of(captions, domain="alice"):
    return pd.DataFrame({
        "path": [f"/data/{domain}/img_{i}.jpg" for i in range(len(captions))], "domain": domain,
        "sha256": [f"{i:064x}" for i in range(len(captions))], "width": 64, "height": 64,
        "caption": captions, "caption_source": "sidecar",
    })[DATASET_COLUMNS]


def test_tag_shuffling_is_a_fixed_permutation_per_image():
    tags = "one, two, three, four, five, six, seven, eight"
    first = shuffle_tags(tags, "ab" * 32)
    assert first == shuffle_tags(tags, "ab" * 32)  # same image, same caption: DVC sees no change on a rerun
    assert sorted(first.split(", ")) == sorted(tags.split(", ")) and first != tags
    assert shuffle_tags(tags, "cd" * 32) != first  # 8! orders: another image gets another one
    kept = shuffle_tags("sks person, " + tags, "ab" * 32, keep=1)
    assert kept.startswith("sks person, ") and sorted(kept.split(", ")[1:]) == sorted(tags.split(", "))
    assert shuffle_tags(" a ,, b ,", "00" * 32) in ("a, b", "b, a")  # empty tags and stray spaces dropped


def test_prefix_suffix_shuffle_and_filter():
    dataset = frame_of(["a woman with red hair, smiling", "a man in a hat", "A Woman, outdoors", "portrait of a woman"])
    cfg = CaptionConfig(prefix="photo of {domain}, ", suffix=", {stem}", shuffle_tags=True, keep_tags=1, caption_filter={"regex": "^a woman"})
    subset, captions = finish_captions(dataset, cfg)
    assert list(subset.columns) == DATASET_COLUMNS and list(captions.columns) == CAPTIONS_COLUMNS
    assert list(subset["path"]) == ["/data/alice/img_0.jpg", "/data/alice/img_2.jpg"]  # ignore_case by default; filtered before the prefix
    by_path = captions.set_index("path")
    first = by_path.loc["/data/alice/img_0.jpg", "caption"]
    assert first.startswith("photo of alice, ") and sorted(first.split(", ")) == sorted(["photo of alice", "a woman with red hair", "smiling", "img_0"])
    assert by_path.loc["/data/alice/img_1.jpg", "status"] == "rejected"
    assert by_path.loc["/data/alice/img_1.jpg", "reason"] == "caption_filter: caption 'a man in a hat' does not match regex '^a woman'"

    plain = CaptionConfig(caption_filter={"contains": ["hat", "outdoors"], "ignore_case": False})
    subset, captions = finish_captions(dataset, plain)
    assert list(subset["caption"]) == ["a man in a hat", "A Woman, outdoors"]  # untouched without prefix/shuffle
    assert captions.loc[0, "reason"] == "caption_filter: caption 'a woman with red hair, smiling' contains none of ['hat', 'outdoors']"
    everything, _ = finish_captions(dataset, CaptionConfig())
    pd.testing.assert_frame_equal(everything, dataset)


def test_filter_params_are_checked():
    with pytest.raises(ParamsError, match=r"caption\.caption_filter: .*exactly one of regex or contains"):
        parse_section({"caption_filter": {"regex": "a", "contains": ["b"]}}, CaptionConfig, "caption")
    with pytest.raises(ParamsError, match=r"caption\.caption_filter: .*does not compile"):
        parse_section({"caption_filter": {"regex": "(unclosed"}}, CaptionConfig, "caption")
    with pytest.raises(ParamsError, match=r"caption\.prefix: .*unknown placeholder\(s\) \{name\}"):
        parse_section({"prefix": "{name}, "}, CaptionConfig, "caption")


def test_stage_writes_subset_and_full_list(models, images, tmp_path):
    folder = shutil.copytree(images[0], tmp_path / "images")
    (folder / "img_1.txt").write_text("a woman, outdoors")
    (folder / "img_2.caption").write_text("a man, indoors")
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    manifest.to_parquet(tmp_path / "manifest.parquet")
    params = {"caption": {"captioner": "transformers", "model": str(models["blip"]), "max_new_tokens": 6,
                          "prefix": "photo of {domain}, ", "caption_filter": {"regex": "^a woman"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--manifest", "manifest.parquet", "--out", "dataset.parquet", "--captions-out", "captions.parquet", "--store", "store"]
    proc = run([sys.executable, "-m", "stages.caption", *args], tmp_path, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert "3 sidecar, 0 memoised, 2 new from the transformers captioner" in proc.stderr, proc.stderr
    dataset, captions = pd.read_parquet(tmp_path / "dataset.parquet"), pd.read_parquet(tmp_path / "captions.parquet")
    assert len(captions) == 5 and list(dataset.columns) == DATASET_COLUMNS
    rows = names(captions)
    assert rows["img_1.png"]["status"] == "kept" and rows["img_1.png"]["caption"] == "photo of a, a woman, outdoors"
    assert rows["img_2.png"]["status"] == "rejected" and rows["img_2.png"]["reason"].startswith("caption_filter: caption 'a man, indoors'")
    assert set(names(dataset)) == {k for k, r in rows.items() if r["status"] == "kept"}
    assert set(rows) - set(names(dataset)) >= {"img_0.png", "img_2.png"}  # the model's random words rarely start "a woman"
