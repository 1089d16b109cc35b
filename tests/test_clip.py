"""CLIP scoring with a tiny random open_clip model saved as a real checkpoint and loaded back by path:
embeddings stored float16 per image and reused, zero-shot probabilities, and fast clear failures offline."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from stagewise.cli import StageError
from stagewise.curation.clip import ClipConfig, Embedder, locate, zero_shot
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.io import read_parquet_dir
from tiny_clip import tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_fields(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def photos(folder, n, size=(64, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(list(folder.iterdir())))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img_{len(list(folder.iterdir())):02d}.png")
    return ingest({"a": folder}, IngestConfig(), folder.parent / "ingest-store")[0]


def test_embeddings_are_stored_float16_and_reused(clip_fields, tmp_path):
    manifest = photos(tmp_path / "in", 5)
    cfg = ClipConfig(**clip_fields)
    first = Embedder(cfg, tmp_path / "clip", "test.clip").images(manifest)
    assert first.embedded == 5 and not first.errors
    vectors = np.stack([first.embeddings[s] for s in manifest["sha256"]])
    assert vectors.dtype == np.float16 and vectors.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)  # unit rows

    stored = read_parquet_dir(tmp_path / "clip" / "images")
    assert len(stored) == 5 and set(stored["dim"]) == {32}
    assert all(len(b) == 32 * 2 for b in stored["embedding"])  # float16 bytes on disk

    # A fresh embedder (a rerun): nothing recomputed and the model not even loaded; one new image -> one.
    again = Embedder(cfg, tmp_path / "clip", "test.clip")
    assert again.images(manifest).embedded == 0 and again._model is None
    bigger = photos(tmp_path / "in", 1)
    result = again.images(bigger)
    assert result.embedded == 1 and set(result.embeddings) == set(bigger["sha256"])


def test_loaded_through_open_clip_with_the_checkpoint_weights(clip_fields, tmp_path):
    """The stored embedding is open_clip's encode_image of the checkpoint's weights (not a random re-init)."""
    import open_clip
    import torch

    manifest = photos(tmp_path / "in", 2)
    cfg = ClipConfig(**clip_fields)
    got = Embedder(cfg, tmp_path / "clip", "test.clip").images(manifest).embeddings
    model, _, preprocess = open_clip.create_model_and_transforms(clip_fields["model"], pretrained=clip_fields["pretrained"])
    model.eval()
    for row in manifest.itertuples():
        with torch.no_grad():
            want = model.encode_image(preprocess(Image.open(row.path).convert("RGB"))[None], normalize=True)[0].numpy()
        np.testing.assert_allclose(got[row.sha256].astype(np.float32), want, atol=2e-3)

    other = tiny_clip(tmp_path / "other-seed", seed=1)  # different weights: a different fingerprint, recomputed
    assert locate(ClipConfig(**other), "test.clip").fingerprint != locate(cfg, "test.clip").fingerprint
    assert Embedder(ClipConfig(**other), tmp_path / "clip", "test.clip").images(manifest).embedded == 2


def test_zero_shot_is_clips_two_way_softmax(clip_fields, tmp_path):
    manifest = photos(tmp_path / "in", 3)
    embedder = Embedder(ClipConfig(**clip_fields), tmp_path / "clip", "test.clip")
    vectors = np.stack([embedder.images(manifest).embeddings[s] for s in manifest["sha256"]])
    pairs = [("a photo with a watermark", "a clean photo"), ("text overlay", "no overlay")]
    p = zero_shot(vectors, pairs, embedder)

    texts = embedder.model.embed_texts([t for pair in pairs for t in pair])
    logits = embedder.model.logit_scale * vectors.astype(np.float32) @ texts.T
    want = np.mean([1 / (1 + np.exp(logits[:, 2 * k + 1] - logits[:, 2 * k])) for k in range(len(pairs))], axis=0)
    np.testing.assert_allclose(p, want, rtol=1e-5)
    assert ((p > 0) & (p < 1)).all()

    fresh = Embedder(ClipConfig(**clip_fields), tmp_path / "clip", "test.clip")  # prompts memoised too
    np.testing.assert_allclose(zero_shot(vectors, pairs, fresh), p, rtol=1e-6)
    assert fresh._model is None


def test_unreadable_image_is_an_error_not_a_memo(clip_fields, tmp_path):
    manifest = photos(tmp_path / "in", 2)
    victim = manifest["path"].iloc[0]
    original = open(victim, "rb").read()
    open(victim, "wb").write(original[:40])  # edited after ingest
    result = Embedder(ClipConfig(**clip_fields), tmp_path / "clip", "test.clip").images(manifest)
    sha = manifest["sha256"].iloc[0]
    assert result.errors[sha].startswith("changed since ingest") and result.embedded == 1
    open(victim, "wb").write(original)
    assert Embedder(ClipConfig(**clip_fields), tmp_path / "clip", "test.clip").images(manifest).embedded == 1


def test_offline_tag_fails_fast_and_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(StageError) as err:
        locate(ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"), "watermark.clip")
    assert time.perf_counter() - start < 5  # no 25 s of download retries
    message = str(err.value)
    assert message.startswith("watermark.clip.pretrained: cannot load CLIP weights ViT-B-32/laion2b_s34b_b79k")
    assert "HF_HUB_OFFLINE=1" in message and "set `watermark.clip.pretrained: /path/to/open_clip_model.safetensors`" in message
    with pytest.raises(StageError, match=r"watermark\.clip\.model: cannot load model 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K'.*offline"):
        locate(ClipConfig(model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"), "watermark.clip")


def test_bad_settings_name_the_key(tmp_path, clip_fields):
    with pytest.raises(StageError, match=r"near_dup\.clip\.pretrained: 'nope' is neither a file nor a weight tag of ViT-B-32 \(tags: openai, "):
        locate(ClipConfig(model="ViT-B-32", pretrained="nope"), "near_dup.clip")
    with pytest.raises(StageError, match=r"near_dup\.clip\.pretrained: no checkpoint file at .*missing\.safetensors"):
        locate(ClipConfig(model="ViT-B-32", pretrained=str(tmp_path / "missing.safetensors")), "near_dup.clip")
    with pytest.raises(StageError, match=r"near_dup\.clip\.pretrained: required"):
        locate(ClipConfig(model="ViT-B-32"), "near_dup.clip")
    with pytest.raises(StageError, match=r"near_dup\.clip\.model: unknown open_clip architecture 'ViT-Q'"):
        locate(ClipConfig(model="ViT-Q", pretrained="x"), "near_dup.clip")
    with pytest.raises(StageError, match=r"near_dup\.clip\.model: must be 'tiny-clip', the stem of config_file"):
        locate(ClipConfig(**{**clip_fields, "model": "other"}), "near_dup.clip")
    with pytest.raises(StageError, match=r"near_dup\.clip\.model: .* has no open_clip_config\.json"):
        locate(ClipConfig(model=f"local-dir:{tmp_path}"), "near_dup.clip")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest keeps the whole suite offline
