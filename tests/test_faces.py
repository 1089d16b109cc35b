"""Faces end to end on real photos and the real bundled models: mediapipe's detector and mesh, PyAV video,
TAEF2 when its weights are here. Every input is generated in the test from photos that ship in packages
(scikit-image's astronaut, matplotlib's Grace Hopper)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import taef2_dir
from stagewise.cache import CacheConfig, update_cache
from stagewise.codecs import CodecConfig, load_codec
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.faces import align
from stagewise.faces import masks as face_masks
from stagewise.faces.extract import AlignConfig, crop_path, extract, mask_path
from stagewise.faces.video import read_frames, write_video
from stagewise.latents import read_latents
from stagewise.train.losses import LossWeights
from stagewise.train.masked import masked_reconstruction, training_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CROP_PX = 64  # tiny crops: the detector and mesh cost the same, everything after them is cheap


def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


def hopper() -> np.ndarray:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def face_video(path: Path, frames: int, noise_every: int = 0) -> None:
    """A small clip of the astronaut drifting sideways; every ``noise_every``-th frame is noise (no face)."""
    base = np.ascontiguousarray(astronaut()[40:296, 120:376])  # 256 px around the face (76 px)
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 255, base.shape, dtype=np.uint8) if noise_every and i % noise_every == noise_every - 1 else np.roll(base, 2 * i, axis=1) for i in range(frames)]
    write_video(path, clip, 10)


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faces")
    a, b = root / "a", root / "b"
    ast = astronaut()
    save(a / "astronaut.png", ast)
    save(a / "tiny.png", np.asarray(Image.fromarray(ast).resize((160, 160))))  # a 33 px face
    save(a / "huge.png", np.ascontiguousarray(ast[90:200, 170:290]))  # the face fills the photo: its crop is half outside
    tile = np.asarray(Image.fromarray(ast[40:300, 120:380]).resize((200, 200)))
    save(a / "crowd.png", np.concatenate([np.concatenate([tile] * 5, 1)] * 2, 0))  # ten faces
    save(a / "noise.png", np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    face_video(a / "clip.mkv", 6, noise_every=3)
    (a / "empty.mp4").write_bytes(b"")
    (a / "garbage.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4)
    save(b / "hopper.png", hopper())
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def extracted(domains, tmp_path_factory):
    work = tmp_path_factory.mktemp("align")
    manifest, _ = ingest(domains, IngestConfig(min_side_px=64), work / "store/ingest")
    cfg = AlignConfig(enabled=True, crop_px=CROP_PX, every_nth_frame=1)
    faces, computed = extract(manifest, cfg, work / "faces", work / "store/align")
    return manifest, faces, computed, cfg, work


def test_ingest_lists_videos_and_rejects_broken_ones_with_a_reason(extracted):
    manifest = extracted[0].set_index(extracted[0]["path"].map(lambda p: Path(p).name))
    assert manifest.loc["clip.mkv", "status"] == "kept" and manifest.loc["clip.mkv", "format"] == "video/h264"
    assert (manifest.loc["clip.mkv", "width"], manifest.loc["clip.mkv", "height"]) == (256, 256)
    assert manifest.loc["empty.mp4", "status"] == "rejected" and "empty" in manifest.loc["empty.mp4", "reason"]
    assert manifest.loc["garbage.webm", "status"] == "rejected" and "video" in manifest.loc["garbage.webm", "reason"]


def test_align_keeps_one_crop_per_face_and_rejects_the_rest_with_a_reason(extracted):
    _, faces, computed, cfg, work = extracted
    by_source = {Path(p).name: rows for p, rows in faces.groupby("source_path")}
    reasons = {name: rows["reason"].tolist() for name, rows in by_source.items()}
    for name in ("astronaut.png", "hopper.png"):
        (row,) = by_source[name].itertuples()
        assert row.status == "kept" and row.domain == ("a" if name.startswith("astro") else "b")
        assert row.score > 0.8 and len(row.landmarks) == 478 * 2 and len(row.transform) == 6
        crop = Image.open(row.path)
        assert crop.size == (CROP_PX, CROP_PX) and Path(row.path) == crop_path(work / "faces", row.sha256)
        assert mask_path(work / "faces", row.sha256).exists()
    assert reasons["tiny.png"][0].startswith("face too small: 33 px < min_face_px 64")
    assert reasons["huge.png"][0].startswith("face cut off")
    assert reasons["crowd.png"][0].startswith("too many faces") and len(reasons["crowd.png"]) == 1
    assert reasons["noise.png"] == ["no face: the detector found none"]
    clip = by_source["clip.mkv"].sort_values("frame_index")
    assert clip["frame_index"].tolist() == [0, 1, 2, 3, 4, 5]
    assert clip["status"].tolist() == ["kept", "kept", "rejected", "kept", "kept", "rejected"]
    assert clip["reason"].iloc[2] == "frame 2 (0.20 s): no face: the detector found none"
    assert np.allclose(clip["time_s"].iloc[:2], [0.0, 0.1])
    assert computed == 7  # every readable source once (the broken videos never got past ingest)


def test_align_is_memoised_and_redoes_a_source_whose_crop_went_missing(extracted):
    manifest, faces, _, cfg, work = extracted
    again, computed = extract(manifest, cfg, work / "faces", work / "store/align")
    assert computed == 0
    pd.testing.assert_frame_equal(again, faces)
    astro = faces[faces["source_path"].str.endswith("astronaut.png")].iloc[0]
    Path(astro["path"]).unlink()
    again, computed = extract(manifest, cfg, work / "faces", work / "store/align")
    assert computed == 1 and Path(astro["path"]).exists()


def test_profile_faces_are_rejected_by_the_yaw_limit(extracted):
    manifest, _, _, cfg, work = extracted
    strict = cfg.model_copy(update={"max_yaw": 0.01})  # the astronaut's nose is 0.017 eye distances off centre
    faces, _ = extract(manifest[manifest["path"].str.endswith("astronaut.png")], strict, work / "faces_strict", work / "store/align")
    assert faces["reason"].iloc[0].startswith("profile: yaw 0.02 > max_yaw 0.01")


def test_align_disabled_passes_images_through_and_rejects_videos(extracted, tmp_path):
    manifest = extracted[0]
    faces, computed = extract(manifest, AlignConfig(enabled=False), tmp_path / "faces", tmp_path / "store")
    images = faces[faces["format"] != "video/h264"]
    assert computed == 0 and (images["status"] == "kept").all() and set(images["path"]) < set(manifest["path"])
    video = faces[faces["path"].str.endswith("clip.mkv")].iloc[0]
    assert video["status"] == "rejected" and "align.enabled" in video["reason"]


def test_cache_stores_masks_at_latent_size_flipped_with_their_rows(extracted, tmp_path):
    _, faces, _, _, work = extracted
    dataset = faces[faces["status"] == "kept"].assign(caption="a face")
    codec = load_codec(CodecConfig(name="pixels"))
    update_cache(dataset, tmp_path / "cache", 32, codec, CacheConfig(flip=True, workers=1), masks_dir=work / "faces/masks")
    rows = read_latents(tmp_path / "cache")
    assert rows["mask"].notna().all()
    for sha, pair in rows.groupby("sha256"):
        plain, mirrored = (np.frombuffer(pair.loc[pair["flipped"] == f, "mask"].iloc[0], np.uint8).reshape(2, 32, 32) for f in (False, True))
        np.testing.assert_array_equal(plain[:, :, ::-1], mirrored)
        face, eyes_mouth = plain / 255.0
        assert 0.2 < face.mean() < 0.8 and 0 < eyes_mouth.mean() < face.mean()
        assert (eyes_mouth <= face + 0.5).all()  # the eyes and mouth lie inside the face


def _latents_and_masks(extracted, codec_name: str, size_px: int):
    """The astronaut's aligned crop at ``size_px`` as the trainer sees it (normalised latent) and its masks
    at latent size, the way the cache makes them (box-filtered mask PNG)."""
    _, faces, _, _, _ = extracted
    row = faces[faces["source_path"].str.endswith("astronaut.png")].iloc[0]
    mat = np.array(row["transform"]).reshape(2, 3) * (size_px / CROP_PX)
    landmarks = np.array(row["landmarks"]).reshape(-1, 2)
    crop = align.warp(astronaut(), mat, size_px)
    codec = load_codec(CodecConfig(name=codec_name))
    rgb = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latent = codec.normalize(codec.encode(rgb))
    px = latent.shape[-1]
    mask = Image.fromarray(face_masks.mask_image(align.apply(mat, landmarks), size_px)).resize((px, px), Image.BOX)
    masks = torch.from_numpy(np.asarray(mask)[..., :2].copy()).permute(2, 0, 1)[None].float() / 255
    return latent, masks


@pytest.mark.parametrize("codec_name", ["pixels", pytest.param("taef2", marks=pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not found"))])
def test_masked_training_ignores_the_target_outside_the_mask(extracted, codec_name, monkeypatch):
    if codec_name == "taef2":
        monkeypatch.setenv("STAGEWISE_MODELS", str(taef2_dir().parent))
    target, masks = _latents_and_masks(extracted, codec_name, 64 if codec_name == "pixels" else 256)  # 32 latent px on TAEF2
    outside = (training_mask(masks[:, :1]) == 0).expand_as(target)
    assert 0.1 < outside.float().mean() < 0.9
    changed = torch.where(outside, torch.randn_like(target) * 3, target)  # a different background, same face
    pred = (target + 0.3 * torch.randn_like(target)).requires_grad_(True)
    weights = LossWeights(mse=1.0, ssim=1.0)

    def loss_and_grad(tgt, masked: bool, prio: bool):
        pred.grad = None
        loss, _ = masked_reconstruction(pred, tgt, masks, weights, masked, prio)
        loss.backward()
        return loss.detach(), pred.grad.clone()

    for prio in (False, True):
        base, grad = loss_and_grad(target, True, prio)
        other, other_grad = loss_and_grad(changed, True, prio)
        assert torch.equal(base, other) and torch.equal(grad, other_grad)
    unmasked, _ = loss_and_grad(target, False, False)
    unmasked_changed, _ = loss_and_grad(changed, False, False)
    assert not torch.isclose(unmasked, unmasked_changed)  # the control: without the mask the background counts
    plain, _ = loss_and_grad(target, False, False)
    prio, _ = loss_and_grad(target, False, True)
    assert prio > plain  # eyes_mouth_prio adds its weighted term


def test_video_reading_survives_truncation_and_keeps_every_readable_frame(tmp_path):
    path = tmp_path / "long.mkv"
    face_video(path, 24)
    whole = [f for f in read_frames(path) if hasattr(f, "rgb")]
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.9)])  # the first key frame is ~80 % of this tiny file
    partial = list(read_frames(cut))
    frames = [f for f in partial if hasattr(f, "rgb")]
    assert len(whole) == 24 and 0 < len(frames) < 24
    for got, want in zip(frames, whole):
        assert got.index == want.index and np.array_equal(got.rgb, want.rgb)


def test_the_trainer_uses_the_cache_masks_and_refuses_a_cache_without_them(tmp_path):
    import dataclasses
    import hashlib

    import torch.nn.functional as F

    from stagewise.cli import StageError
    from stagewise.latents import ShardWriter, to_bytes
    from stagewise.train.loop import run_stage
    from test_trainer import TINY_DEFAULTS, job, stage, train_cfg, write_init

    px = 16
    for with_masks in (True, False):
        writer = ShardWriter(tmp_path / f"cache{int(with_masks)}" / str(px))
        gen = torch.Generator().manual_seed(0)
        face = np.zeros((2, px, px), np.uint8)
        face[0, 3:13, 4:12] = 255  # the face
        face[1, 5:7, 5:11] = 255  # the eyes
        for domain in "ab":
            for i in range(4):
                image = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(px, px), mode="bilinear")[0]
                sha = hashlib.sha256(f"{domain}{i}".encode()).hexdigest()
                for flipped in (False, True):
                    x = image.flip(-1) if flipped else image
                    mask = np.ascontiguousarray(face[:, :, ::-1] if flipped else face).tobytes() if with_masks else None
                    writer.add(sha256=sha, domain=domain, resolution=px, codec_id="pixels", shape=list(x.shape), latent=to_bytes(x),
                               flipped=flipped, caption="", fingerprint="test", mask=mask)
        writer.flush()
    write_init(tmp_path / "runs" / "init")
    train = train_cfg({"m": stage(kimg=0.016, masked_training=True, eyes_mouth_prio=True)}, **TINY_DEFAULTS)
    masked = dataclasses.replace(job(tmp_path, "m", train), cache_dir=tmp_path / "cache1" / str(px))
    metrics = run_stage(masked)
    history = (tmp_path / "runs/m/history.tsv").read_text().splitlines()
    assert "a_eyes_mouth" in history[0].split("\t") and metrics["kimg"] > 0
    bare = dataclasses.replace(masked, cache_dir=tmp_path / "cache0" / str(px), out_dir=tmp_path / "runs/m2", backups_dir=tmp_path / "runs/m2/backups")
    with pytest.raises(StageError, match="without face masks; masked_training"):
        run_stage(bare)
